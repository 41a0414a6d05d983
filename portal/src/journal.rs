//! Every deployment's stream of events: stored first, then announced live.
//!
//! An event is appended to the store (which numbers it) before it is broadcast,
//! so a follower that reads the store after event `n` and then takes live
//! events numbered above what it has read neither loses nor repeats one — the
//! contract the API's event stream (and its `Last-Event-ID`) is built on.

use std::sync::Arc;

use image_spec::InstanceName;
use tokio::sync::broadcast;
use tracing::warn;
use wire::portal::DeploymentId;

use crate::deployment::{Event, EventKind, now_ms};
use crate::store::Store;

/// How many live events a slow follower may fall behind before it re-reads the
/// store.
const LIVE_BACKLOG: usize = 4096;

/// The deployments' event streams (see the module docs).
pub struct Journal {
    store: Arc<dyn Store>,
    live: broadcast::Sender<(DeploymentId, Event)>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// A journal over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            live: broadcast::channel(LIVE_BACKLOG).0,
        }
    }

    /// Records events of deployment `id` now. A store that fails loses them
    /// (logged): progress is not worth failing a deployment for.
    pub async fn record(&self, id: DeploymentId, events: Vec<(Option<InstanceName>, EventKind)>) {
        if events.is_empty() {
            return;
        }
        let at = now_ms();
        let events = events.into_iter().map(|(i, k)| (at, i, k)).collect();
        match self.store.append_events(id, events).await {
            Ok(stored) => {
                for event in stored {
                    // Nobody listening is fine.
                    let _ = self.live.send((id, event));
                }
            }
            Err(e) => warn!(deployment = %id, error = %e, "cannot store deployment events"),
        }
    }

    /// Records one event.
    pub async fn note(&self, id: DeploymentId, instance: Option<&InstanceName>, kind: EventKind) {
        self.record(id, vec![(instance.cloned(), kind)]).await;
    }

    /// Live events of every deployment from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<(DeploymentId, Event)> {
        self.live.subscribe()
    }
}
