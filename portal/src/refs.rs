//! Following the repository's ref moves: branch heads that moved and images
//! created, as the repository's watch stream delivers them.
//!
//! The portal keeps one watch open (reconnecting with backoff), remembers the
//! last event it took in its store (a cursor), and resumes after it on the
//! next start, so nothing that happens while the portal is down is skipped —
//! unless the repository no longer retains it, which is logged. The newest
//! events are kept in memory for the API ([`Refs::after`]) and announced live
//! ([`Refs::subscribe`]) for what reacts to them (later: release automation),
//! so nothing in the portal polls the repository.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use repo_client::RepoClient;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wire::Client;
use wire::repo::RefEvent;

use crate::store::Store;

/// The store cursor of the ref watch.
const CURSOR: &str = "repository-refs";

/// How many recent events the API can list.
const RECENT: usize = 1000;

/// The ref follower (see the module docs).
pub struct Refs {
    store: Arc<dyn Store>,
    client: Client,
    repo: SocketAddr,
    recent: Mutex<VecDeque<RefEvent>>,
    live: broadcast::Sender<RefEvent>,
}

impl std::fmt::Debug for Refs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refs")
            .field("repo", &self.repo)
            .finish_non_exhaustive()
    }
}

impl Refs {
    /// A follower of the repository at `repo`, reached with `client`.
    pub fn new(store: Arc<dyn Store>, client: Client, repo: SocketAddr) -> Self {
        Self {
            store,
            client,
            repo,
            recent: Mutex::new(VecDeque::new()),
            live: broadcast::channel(256).0,
        }
    }

    /// The recent events numbered above `after`, oldest first.
    pub fn after(&self, after: u64) -> Vec<RefEvent> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().filter(|e| e.seq > after).cloned().collect()
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RefEvent> {
        self.live.subscribe()
    }

    /// Follows the watch until `shutdown`, reconnecting with backoff.
    pub async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut delay = Duration::from_millis(200);
        loop {
            let followed = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.watch_once() => result,
            };
            match followed {
                // The repository ended the watch (it shut down): come back soon.
                Ok(()) => delay = Duration::from_millis(200),
                Err(e) => warn!(repo = %self.repo, error = %e, "the ref watch failed; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn watch_once(&self) -> Result<(), String> {
        let repo = RepoClient::connect(&self.client, self.repo)
            .await
            .map_err(|e| e.to_string())?;
        let after = self.store.cursor(CURSOR).await.map_err(|e| e.to_string())?;
        let mut watch = repo
            .watch_refs(Some(after.unwrap_or(0)))
            .await
            .map_err(|e| e.to_string())?;
        if let Some(missed) = watch.missed() {
            warn!(
                first = missed.first,
                last = missed.last,
                "ref events the repository no longer retains were missed"
            );
        }
        info!(after = watch.seen(), "following the repository's refs");
        while let Some(event) = watch.next().await.map_err(|e| e.to_string())? {
            self.store
                .put_cursor(CURSOR, event.seq)
                .await
                .map_err(|e| e.to_string())?;
            {
                let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                if recent.len() == RECENT {
                    recent.pop_front();
                }
                recent.push_back(event.clone());
            }
            // Nobody listening is fine.
            let _ = self.live.send(event);
        }
        Ok(())
    }
}
