//! A generation's lifecycle, as a state machine published on a `watch` channel.
//!
//! A generation goes `starting → healthy → serving → draining → stopped`, or
//! from `starting` or `healthy` to `failed`; the generation a shell opens with
//! is `serving` from the start. Any other move is refused ([`transition`]), so a
//! phase seen by a subscriber always followed the one before it. Every phase a
//! generation passed through is kept, so tests (and operators) can check the
//! order, not only the last phase.

use tokio::sync::watch;
use tracing::{info, warn};
use wire::shell::{GenerationPhase, Phase};

/// A move the lifecycle refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("generation {number} cannot go from {from:?} to {to}")]
pub struct IllegalTransition {
    /// The generation.
    pub number: u64,
    /// Its phase (none: not seen yet).
    pub from: Option<Phase>,
    /// The phase refused.
    pub to: Phase,
}

/// Is `from → to` a legal move?
pub fn transition(from: Option<Phase>, to: Phase) -> bool {
    use Phase::*;
    matches!(
        (from, to),
        (None, Starting | Serving)
            | (Some(Starting), Healthy | Failed)
            | (Some(Healthy), Serving | Failed)
            | (Some(Serving), Draining)
            | (Some(Draining), Stopped)
    )
}

/// One generation's phases so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationLife {
    /// Its number.
    pub number: u64,
    /// Every phase it went through, in order; the last is its phase now.
    pub phases: Vec<Phase>,
}

/// The latest generations and the last failure, as published.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generations {
    /// The latest generations, oldest first (at most [`Generations::KEPT`]).
    pub generations: Vec<GenerationLife>,
    /// Why the last generation that failed did.
    pub last_failure: Option<String>,
    /// The generation serving now.
    pub serving: Option<u64>,
}

impl Generations {
    /// How many generations are kept.
    pub const KEPT: usize = 3;

    /// Every phase generation `number` went through (empty if unknown).
    pub fn history(&self, number: u64) -> Vec<Phase> {
        self.generations
            .iter()
            .find(|g| g.number == number)
            .map(|g| g.phases.clone())
            .unwrap_or_default()
    }

    /// Each kept generation with its phase now, as `status` reports them.
    pub fn phases(&self) -> Vec<GenerationPhase> {
        self.generations
            .iter()
            .filter_map(|g| {
                Some(GenerationPhase {
                    number: g.number,
                    phase: *g.phases.last()?,
                })
            })
            .collect()
    }

    fn apply(&mut self, number: u64, to: Phase) -> Result<(), IllegalTransition> {
        let from = self
            .generations
            .iter()
            .find(|g| g.number == number)
            .and_then(|g| g.phases.last().copied());
        if !transition(from, to) {
            return Err(IllegalTransition { number, from, to });
        }
        match self.generations.iter_mut().find(|g| g.number == number) {
            Some(g) => g.phases.push(to),
            None => self.generations.push(GenerationLife {
                number,
                phases: vec![to],
            }),
        }
        self.generations.sort_by_key(|g| g.number);
        let excess = self.generations.len().saturating_sub(Self::KEPT);
        self.generations.drain(..excess);
        Ok(())
    }
}

/// The instance's generations' lifecycle (see the module docs).
#[derive(Debug)]
pub struct Lifecycle {
    tx: watch::Sender<Generations>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(Generations::default()),
        }
    }
}

impl Lifecycle {
    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Generations> {
        self.tx.subscribe()
    }

    /// The generations now.
    pub fn snapshot(&self) -> Generations {
        self.tx.borrow().clone()
    }

    /// Moves generation `number` to `to`, if that is a legal move.
    pub fn try_set(&self, number: u64, to: Phase) -> Result<(), IllegalTransition> {
        let mut result = Ok(());
        self.tx.send_modify(|g| result = g.apply(number, to));
        match result {
            Ok(()) => info!(generation = number, phase = %to, "generation"),
            Err(e) => warn!(error = %e, "refused a lifecycle move"),
        }
        result
    }

    /// [`Lifecycle::try_set`], a refusal logged (the executor's moves are legal
    /// by construction; the tests hold it).
    pub fn set(&self, number: u64, to: Phase) {
        let _ = self.try_set(number, to);
    }

    /// The generation the shell opened with serves.
    pub fn opened(&self, number: u64) {
        self.set(number, Phase::Serving);
        self.tx.send_modify(|g| g.serving = Some(number));
    }

    /// A new generation starts.
    pub fn begin(&self, number: u64) {
        self.set(number, Phase::Starting);
    }

    /// Generation `number` serves; the one that served before drains.
    pub fn serving(&self, number: u64) {
        self.set(number, Phase::Serving);
        let previous = self.tx.borrow().serving;
        if let Some(p) = previous.filter(|p| *p != number) {
            self.set(p, Phase::Draining);
        }
        self.tx.send_modify(|g| g.serving = Some(number));
    }

    /// Every generation that drains now has stopped (the new one, `number`,
    /// serves).
    pub fn retire_previous(&self, number: u64) {
        let draining: Vec<u64> = self
            .tx
            .borrow()
            .generations
            .iter()
            .filter(|g| g.number != number && g.phases.last() == Some(&Phase::Draining))
            .map(|g| g.number)
            .collect();
        for n in draining {
            self.set(n, Phase::Stopped);
        }
    }

    /// Generation `number` failed, for `why`.
    pub fn fail(&self, number: u64, why: &str) {
        self.set(number, Phase::Failed);
        self.tx
            .send_modify(|g| g.last_failure = Some(format!("generation {number}: {why}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_forward_moves_are_legal() {
        use Phase::*;
        let legal = [
            (None, Starting),
            (None, Serving),
            (Some(Starting), Healthy),
            (Some(Starting), Failed),
            (Some(Healthy), Serving),
            (Some(Healthy), Failed),
            (Some(Serving), Draining),
            (Some(Draining), Stopped),
        ];
        let all = [Starting, Healthy, Serving, Draining, Stopped, Failed];
        for from in std::iter::once(None).chain(all.map(Some)) {
            for to in all {
                assert_eq!(
                    transition(from, to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn an_illegal_move_is_refused_and_changes_nothing() {
        let l = Lifecycle::default();
        let mut rx = l.subscribe();
        l.begin(4);
        assert_eq!(
            l.try_set(4, Phase::Draining),
            Err(IllegalTransition {
                number: 4,
                from: Some(Phase::Starting),
                to: Phase::Draining
            })
        );
        l.fail(4, "hello did not become healthy");
        // A failed generation stays failed.
        assert!(l.try_set(4, Phase::Serving).is_err());
        let seen = rx.borrow_and_update().clone();
        assert_eq!(seen.history(4), [Phase::Starting, Phase::Failed]);
        assert_eq!(
            seen.last_failure.as_deref(),
            Some("generation 4: hello did not become healthy")
        );
    }

    #[test]
    fn serving_drains_the_previous_one_and_only_three_are_kept() {
        let l = Lifecycle::default();
        l.opened(1);
        for n in 2..=5 {
            l.begin(n);
            l.set(n, Phase::Healthy);
            l.serving(n);
            l.retire_previous(n);
        }
        let g = l.snapshot();
        assert_eq!(g.generations.len(), Generations::KEPT);
        assert_eq!(
            g.history(4),
            [
                Phase::Starting,
                Phase::Healthy,
                Phase::Serving,
                Phase::Draining,
                Phase::Stopped
            ]
        );
        assert_eq!(g.serving, Some(5));
        assert_eq!(
            g.phases().last(),
            Some(&GenerationPhase {
                number: 5,
                phase: Phase::Serving
            })
        );
    }
}
