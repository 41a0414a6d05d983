//! The embedded store: the portal's records in a sled database under its data
//! directory.
//!
//! Trees: `targets`, `instances`, `deployments` (by id, big-endian: the main
//! record), `runs` and `plans` (id and instance name → that instance's part and
//! the plan it showed, written on their own so a deployment over many
//! instances is not rewritten whole at each step), `by_target` (target name,
//! NUL, id: each target's deployments without a scan of all), `queue`
//! (position → id),
//! `running` (target → id: at most one per target), `events` (id and sequence
//! number → event), `users`, `tokens` (id → token),
//! `token_hashes` (hash → id), `sessions` (hash of the session id → session),
//! `audit` (sequence number → entry), `watches` (run number → watch run) with
//! `watches_by_target` (target name, NUL, run number: a target's runs
//! without a scan of all; the newest [`KEEP_WATCHES`] per target kept) and
//! `meta` (counters). Records are encoded with the wire's record codec.
//!
//! One process owns the database (sled locks its directory), and every write
//! goes through one mutex, so each [`Store`] operation is atomic here; the
//! writes that span trees are one sled transaction, so a crash leaves all or
//! none of them. Changes of state are flushed before the call returns; events
//! are flushed by sled's own timer (a crash may lose the last half second of
//! progress lines, never a state).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use image_spec::{InstanceName, TargetName, UserName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use wire::codec::{decode_record, encode_record};
use wire::plan::UpgradePlan;
use wire::portal::DeploymentId;

use super::{DeploymentFilter, Store, StoreError, StoreFuture};
use crate::auth::{AuditEntry, Session, Token, User};
use crate::deployment::{
    Deployment, DeploymentState, Event, EventKind, InstanceRun, Millis, NewDeployment, Transition,
};
use crate::target::{InstanceRecord, Target};
use crate::watch::{NewWatch, WatchCycle, WatchError, WatchRun};

/// The page cache sled may use: the records are small.
const CACHE_BYTES: u64 = 16 << 20;

/// Where queue positions of ordinary deployments start; positions below it are
/// the ones moved to the front, newest move first.
const QUEUE_BASE: u64 = 1 << 62;

/// The portal's records in sled.
pub struct SledStore {
    db: sled::Db,
    targets: sled::Tree,
    instances: sled::Tree,
    deployments: sled::Tree,
    queue: sled::Tree,
    running: sled::Tree,
    events: sled::Tree,
    users: sled::Tree,
    tokens: sled::Tree,
    token_hashes: sled::Tree,
    sessions: sled::Tree,
    runs: sled::Tree,
    plans: sled::Tree,
    by_target: sled::Tree,
    audit: sled::Tree,
    watches: sled::Tree,
    watches_by_target: sled::Tree,
    meta: sled::Tree,
    write: Mutex<()>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, StoreError> {
    encode_record(record).map_err(backend)
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_record(bytes).map_err(|e| StoreError::Corrupt {
        what,
        message: e.to_string(),
    })
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// A deployment id stored as 8 big-endian bytes.
fn id_of(bytes: &[u8], what: &'static str) -> Result<DeploymentId, StoreError> {
    let bytes: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        what,
        message: "not 8 bytes".into(),
    })?;
    Ok(DeploymentId(u64::from_be_bytes(bytes)))
}

/// The key of a deployment in its target's index: the target's name, a NUL
/// (names never hold one), its id.
fn target_key(target: &TargetName, id: DeploymentId) -> Vec<u8> {
    let mut key = target.as_str().as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&be(id.0));
    key
}

/// The key of an instance's entry of a deployment: its id, then the name.
fn part_key(id: DeploymentId, instance: &InstanceName) -> Vec<u8> {
    let mut key = be(id.0).to_vec();
    key.extend_from_slice(instance.as_str().as_bytes());
    key
}

/// The instance a [`part_key`] names.
fn instance_of(key: &[u8]) -> Result<InstanceName, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        what: "instance key",
        message,
    };
    let name = key
        .get(8..)
        .ok_or_else(|| corrupt("shorter than 8 bytes".into()))?;
    let name = std::str::from_utf8(name).map_err(|e| corrupt(e.to_string()))?;
    InstanceName::new(name).map_err(|e| corrupt(e.to_string()))
}

/// A deployment's main record: without its instances' parts and plans, which
/// live in trees of their own.
fn main_record(d: &Deployment) -> Result<Vec<u8>, StoreError> {
    let mut main = d.clone();
    main.instances.clear();
    main.plans.clear();
    encode(&main)
}

fn event_key(id: DeploymentId, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&be(id.0));
    key[8..].copy_from_slice(&be(seq));
    key
}

fn ready<'a, T: Send + 'a>(result: Result<T, StoreError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = embedded_db::open(dir, CACHE_BYTES).map_err(backend)?;
        let tree = |name: &str| db.open_tree(name).map_err(backend);
        Ok(Self {
            targets: tree("targets")?,
            instances: tree("instances")?,
            deployments: tree("deployments")?,
            queue: tree("queue")?,
            running: tree("running")?,
            events: tree("events")?,
            users: tree("users")?,
            tokens: tree("tokens")?,
            token_hashes: tree("token_hashes")?,
            sessions: tree("sessions")?,
            runs: tree("runs")?,
            plans: tree("plans")?,
            by_target: tree("by_target")?,
            audit: tree("audit")?,
            watches: tree("watches")?,
            watches_by_target: tree("watches_by_target")?,
            meta: tree("meta")?,
            db,
            write: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guard protects no data of its own: a panic while holding it left
        // sled consistent (each write is one transaction).
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        Ok(())
    }

    /// The next value of a counter (from 1).
    fn next(&self, counter: &str) -> Result<u64, StoreError> {
        let n = match self.meta.get(counter).map_err(backend)? {
            Some(v) => id_of(&v, "counter")?.0 + 1,
            None => 1,
        };
        self.meta.insert(counter, &be(n)).map_err(backend)?;
        Ok(n)
    }

    fn get<T: DeserializeOwned>(
        tree: &sled::Tree,
        what: &'static str,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<T>, StoreError> {
        tree.get(key)
            .map_err(backend)?
            .map(|v| decode(what, &v))
            .transpose()
    }

    fn all<T: DeserializeOwned>(
        tree: &sled::Tree,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        tree.iter()
            .values()
            .map(|v| decode(what, &v.map_err(backend)?))
            .collect()
    }

    /// A deployment's whole record: the main record, its instances' parts
    /// and its plans.
    fn load(&self, id: DeploymentId) -> Result<Deployment, StoreError> {
        let mut d = self.load_main(id)?;
        self.attach_runs(&mut d)?;
        for entry in self.plans.scan_prefix(be(id.0)) {
            let (key, v) = entry.map_err(backend)?;
            d.plans.insert(instance_of(&key)?, decode("plan", &v)?);
        }
        Ok(d)
    }

    /// A deployment as lists show it: without its plans.
    fn load_listed(&self, id: DeploymentId) -> Result<Deployment, StoreError> {
        let mut d = self.load_main(id)?;
        self.attach_runs(&mut d)?;
        Ok(d)
    }

    /// The main record alone (no instance parts, no plans).
    fn load_main(&self, id: DeploymentId) -> Result<Deployment, StoreError> {
        Self::get(&self.deployments, "deployment", be(id.0))?.ok_or(StoreError::NoDeployment(id))
    }

    /// Fills in the instances' parts (pending where none was stored).
    fn attach_runs(&self, d: &mut Deployment) -> Result<(), StoreError> {
        for entry in self.runs.scan_prefix(be(d.id.0)) {
            let (key, v) = entry.map_err(backend)?;
            d.instances
                .insert(instance_of(&key)?, decode("instance run", &v)?);
        }
        for instance in &d.order {
            d.instances
                .entry(instance.clone())
                .or_insert_with(InstanceRun::pending);
        }
        Ok(())
    }

    /// Writes the main record only: each instance's part and the plans are
    /// written on their own ([`Store::put_run`], [`Store::put_plans`]), so a
    /// deployment over many instances is not rewritten whole at every step.
    fn save(&self, d: &Deployment) -> Result<(), StoreError> {
        self.deployments
            .insert(be(d.id.0), main_record(d)?)
            .map_err(backend)?;
        Ok(())
    }

    fn sync_put_target(&self, target: Target, replace: bool) -> Result<(), StoreError> {
        let _guard = self.lock();
        let exists = self
            .targets
            .contains_key(target.name.as_str())
            .map_err(backend)?;
        match (exists, replace) {
            (true, false) => return Err(StoreError::TargetExists(target.name)),
            (false, true) => return Err(StoreError::NoTarget(target.name)),
            _ => {}
        }
        for other in Self::all::<Target>(&self.targets, "target")? {
            if other.name == target.name {
                continue;
            }
            if let Some(shared) = target
                .instances
                .iter()
                .find(|i| other.instances.contains(i))
            {
                return Err(StoreError::InstanceTaken {
                    instance: shared.clone(),
                    target: other.name,
                });
            }
        }
        self.targets
            .insert(target.name.as_str(), encode(&target)?)
            .map_err(backend)?;
        self.flush()
    }

    fn sync_enqueue(&self, new: NewDeployment, at: Millis) -> Result<Deployment, StoreError> {
        let _guard = self.lock();
        let id = DeploymentId(self.next("deployment")?);
        let d = Deployment::new(id, new, at);
        let record = main_record(&d)?;
        let indexed = target_key(&d.target, id);
        (&self.deployments, &self.queue, &self.by_target)
            .transaction(|(deployments, queue, by_target)| {
                deployments.insert(&be(id.0), record.as_slice())?;
                queue.insert(&be(QUEUE_BASE + id.0), &be(id.0))?;
                by_target.insert(indexed.as_slice(), &[])?;
                Ok(())
            })
            .map_err(embedded_db::storage_error)
            .map_err(backend)?;
        self.flush()?;
        Ok(d)
    }

    fn sync_claim_next(
        &self,
        max_running: usize,
        at: Millis,
    ) -> Result<Option<Deployment>, StoreError> {
        let _guard = self.lock();
        if self.running.len() >= max_running {
            return Ok(None);
        }
        for entry in self.queue.iter() {
            let (position, id) = entry.map_err(backend)?;
            let id = id_of(&id, "queue entry")?;
            let mut d = self.load(id)?;
            if self
                .running
                .contains_key(d.target.as_str())
                .map_err(backend)?
            {
                continue;
            }
            d.apply(Transition::Start, at)
                .map_err(|source| StoreError::Transition { id, source })?;
            let record = main_record(&d)?;
            (&self.deployments, &self.queue, &self.running)
                .transaction(|(deployments, queue, running)| {
                    deployments.insert(&be(id.0), record.as_slice())?;
                    queue.remove(&position)?;
                    running.insert(d.target.as_str(), &be(id.0))?;
                    Ok(())
                })
                .map_err(embedded_db::storage_error)
                .map_err(backend)?;
            self.flush()?;
            return Ok(Some(d));
        }
        Ok(None)
    }

    fn queue_position(&self, id: DeploymentId) -> Result<Option<sled::IVec>, StoreError> {
        for entry in self.queue.iter() {
            let (position, queued) = entry.map_err(backend)?;
            if queued.as_ref() == be(id.0) {
                return Ok(Some(position));
            }
        }
        Ok(None)
    }

    fn sync_to_front(&self, id: DeploymentId) -> Result<(), StoreError> {
        let _guard = self.lock();
        let d = self.load(id)?;
        let Some(position) = self.queue_position(id)? else {
            return Err(StoreError::Transition {
                id,
                source: crate::deployment::TransitionError {
                    from: d.state,
                    transition: Transition::Start,
                },
            });
        };
        let front = QUEUE_BASE - self.next("front")?;
        self.queue
            .transaction(|queue| {
                queue.remove(&position)?;
                queue.insert(&be(front), &be(id.0))?;
                Ok(())
            })
            .map_err(embedded_db::storage_error)
            .map_err(backend)?;
        self.flush()
    }

    fn sync_transition(
        &self,
        id: DeploymentId,
        transition: Transition,
        failure: Option<String>,
        at: Millis,
    ) -> Result<Deployment, StoreError> {
        let _guard = self.lock();
        let mut d = self.load(id)?;
        let was = d.state;
        d.apply(transition, at)
            .map_err(|source| StoreError::Transition { id, source })?;
        if failure.is_some() {
            d.failure = failure;
        }
        let record = main_record(&d)?;
        // A final state turns the parts that never started into `skipped`.
        let parts = d
            .instances
            .iter()
            .map(|(i, run)| Ok((part_key(id, i), encode(run)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let position = if was == DeploymentState::Queued {
            self.queue_position(id)?
        } else {
            None
        };
        let frees_target = was == DeploymentState::Running && d.state.is_final();
        (&self.deployments, &self.queue, &self.running, &self.runs)
            .transaction(|(deployments, queue, running, runs)| {
                deployments.insert(&be(id.0), record.as_slice())?;
                for (key, run) in &parts {
                    runs.insert(key.as_slice(), run.as_slice())?;
                }
                if let Some(position) = &position {
                    queue.remove(position)?;
                }
                if frees_target {
                    running.remove(d.target.as_str())?;
                }
                Ok(())
            })
            .map_err(embedded_db::storage_error)
            .map_err(backend)?;
        self.flush()?;
        Ok(d)
    }

    fn update(
        &self,
        id: DeploymentId,
        change: impl FnOnce(&mut Deployment) -> Result<(), StoreError>,
    ) -> Result<Deployment, StoreError> {
        let _guard = self.lock();
        let mut d = self.load_main(id)?;
        change(&mut d)?;
        self.save(&d)?;
        self.attach_runs(&mut d)?;
        Ok(d)
    }

    fn sync_deployments(&self, filter: &DeploymentFilter) -> Result<Vec<Deployment>, StoreError> {
        let limit = if filter.limit == 0 {
            usize::MAX
        } else {
            filter.limit
        };
        let mut out = Vec::new();
        let upper = filter.before.map_or(u64::MAX, |b| b.0);
        // One target's deployments come from its index, not a scan of all.
        let records: Box<dyn Iterator<Item = Result<sled::IVec, StoreError>>> = match &filter.target
        {
            Some(target) => Box::new(
                self.by_target
                    .range(
                        target_key(target, DeploymentId(0))
                            ..target_key(target, DeploymentId(upper)),
                    )
                    .keys()
                    .rev()
                    .map(|k| {
                        let k = k.map_err(backend)?;
                        let id = id_of(&k[k.len() - 8..], "target index")?;
                        self.deployments
                            .get(be(id.0))
                            .map_err(backend)?
                            .ok_or(StoreError::NoDeployment(id))
                    }),
            ),
            None => Box::new(
                self.deployments
                    .range(..be(upper))
                    .values()
                    .rev()
                    .map(|v| v.map_err(backend)),
            ),
        };
        for v in records {
            let mut d: Deployment = decode("deployment", &v?)?;
            if filter.matches(&d) {
                // Listed without their plans (one deployment shows them).
                self.attach_runs(&mut d)?;
                out.push(d);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn sync_running(&self) -> Result<Vec<Deployment>, StoreError> {
        self.running
            .iter()
            .values()
            .map(|id| {
                let id = id.map_err(backend)?;
                self.load_listed(id_of(&id, "running entry")?)
            })
            .collect()
    }

    fn sync_queue(&self) -> Result<Vec<Deployment>, StoreError> {
        self.queue
            .iter()
            .values()
            .map(|id| {
                let id = id.map_err(backend)?;
                self.load_listed(id_of(&id, "queue entry")?)
            })
            .collect()
    }

    fn sync_prune(&self, target: &TargetName, keep: usize) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let mut finished = 0;
        let mut dropped = 0;
        for entry in self.deployments.iter().rev() {
            let (key, v) = entry.map_err(backend)?;
            let d: Deployment = decode("deployment", &v)?;
            if d.target != *target || !d.state.is_final() {
                continue;
            }
            finished += 1;
            if finished > keep {
                self.deployments.remove(&key).map_err(backend)?;
                self.by_target
                    .remove(target_key(&d.target, d.id))
                    .map_err(backend)?;
                for tree in [&self.events, &self.runs, &self.plans] {
                    for entry in tree.scan_prefix(&key).keys() {
                        tree.remove(entry.map_err(backend)?).map_err(backend)?;
                    }
                }
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    fn sync_append(
        &self,
        id: DeploymentId,
        events: Vec<(Millis, Option<InstanceName>, EventKind)>,
    ) -> Result<Vec<Event>, StoreError> {
        let _guard = self.lock();
        let last = self
            .events
            .scan_prefix(be(id.0))
            .keys()
            .next_back()
            .transpose()
            .map_err(backend)?
            .map_or(0, |k| {
                u64::from_be_bytes(k[8..16].try_into().expect("event keys are 16 bytes"))
            });
        let mut batch = sled::Batch::default();
        let mut out = Vec::with_capacity(events.len());
        for (i, (at, instance, kind)) in events.into_iter().enumerate() {
            let event = Event {
                seq: last + 1 + i as u64,
                at,
                instance,
                kind,
            };
            batch.insert(&event_key(id, event.seq), encode(&event)?);
            out.push(event);
        }
        self.events.apply_batch(batch).map_err(backend)?;
        Ok(out)
    }

    fn sync_events(
        &self,
        id: DeploymentId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.events
            .range(event_key(id, after.saturating_add(1))..=event_key(id, u64::MAX))
            .values()
            .take(limit)
            .map(|v| decode("event", &v.map_err(backend)?))
            .collect()
    }

    fn sync_put_user(&self, user: User, replace: bool) -> Result<(), StoreError> {
        let _guard = self.lock();
        let exists = self
            .users
            .contains_key(user.name.as_str())
            .map_err(backend)?;
        match (exists, replace) {
            (true, false) => return Err(StoreError::UserExists(user.name)),
            (false, true) => return Err(StoreError::NoUser(user.name)),
            _ => {}
        }
        let before: Option<User> = Self::get(&self.users, "user", user.name.as_str())?;
        let ended = match before {
            Some(b) if b.grant != user.grant || b.password != user.password => {
                self.sessions_of(&user.name)?
            }
            _ => Vec::new(),
        };
        let record = encode(&user)?;
        (&self.users, &self.sessions)
            .transaction(|(users, sessions)| {
                users.insert(user.name.as_str(), record.as_slice())?;
                for key in &ended {
                    sessions.remove(key.as_slice())?;
                }
                Ok(())
            })
            .map_err(embedded_db::storage_error)
            .map_err(backend)?;
        self.flush()
    }

    /// The keys of `user`'s sessions.
    fn sessions_of(&self, user: &UserName) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = Vec::new();
        for kv in self.sessions.iter() {
            let (k, v) = kv.map_err(backend)?;
            let s: Session = decode("session", &v)?;
            if s.user == *user {
                keys.push(k.to_vec());
            }
        }
        Ok(keys)
    }

    fn sync_create_session(&self, session: Session) -> Result<(), StoreError> {
        let _guard = self.lock();
        let mut expired = Vec::new();
        for kv in self.sessions.iter() {
            let (k, v) = kv.map_err(backend)?;
            // An unreadable record is dropped too: it can never be used.
            if decode::<Session>("session", &v).is_ok_and(|s| !s.expired(session.created)) {
                continue;
            }
            expired.push(k);
        }
        for k in expired {
            self.sessions.remove(k).map_err(backend)?;
        }
        self.sessions
            .insert(session.hash, encode(&session)?)
            .map_err(backend)?;
        self.flush()
    }

    fn sync_touch_session(&self, hash: [u8; 32], at: Millis) -> Result<(), StoreError> {
        let _guard = self.lock();
        if let Some(mut s) = Self::get::<Session>(&self.sessions, "session", hash)? {
            s.last_used = s.last_used.max(at);
            self.sessions.insert(hash, encode(&s)?).map_err(backend)?;
        }
        // Not flushed: a crash loses at most half a second of idle time.
        Ok(())
    }

    fn sync_delete_session(&self, hash: [u8; 32]) -> Result<bool, StoreError> {
        let _guard = self.lock();
        let existed = self.sessions.remove(hash).map_err(backend)?.is_some();
        self.flush()?;
        Ok(existed)
    }

    fn sync_delete_user_sessions(&self, user: &UserName) -> Result<usize, StoreError> {
        let _guard = self.lock();
        let keys = self.sessions_of(user)?;
        for k in &keys {
            self.sessions.remove(k.as_slice()).map_err(backend)?;
        }
        self.flush()?;
        Ok(keys.len())
    }

    fn sync_remove_user(&self, name: &UserName, at: Millis) -> Result<(), StoreError> {
        let _guard = self.lock();
        if self.users.remove(name.as_str()).map_err(backend)?.is_none() {
            return Err(StoreError::NoUser(name.clone()));
        }
        for key in self.sessions_of(name)? {
            self.sessions.remove(key).map_err(backend)?;
        }
        for mut token in Self::all::<Token>(&self.tokens, "token")? {
            if token.user == *name && token.revoked.is_none() {
                token.revoked = Some(at);
                self.tokens
                    .insert(token.id.as_str(), encode(&token)?)
                    .map_err(backend)?;
            }
        }
        self.flush()
    }

    fn sync_put_token(&self, token: Token) -> Result<(), StoreError> {
        let _guard = self.lock();
        let record = encode(&token)?;
        (&self.tokens, &self.token_hashes)
            .transaction(|(tokens, hashes)| {
                tokens.insert(token.id.as_str(), record.as_slice())?;
                hashes.insert(&token.hash, token.id.as_str())?;
                Ok(())
            })
            .map_err(embedded_db::storage_error)
            .map_err(backend)?;
        self.flush()
    }

    fn sync_token_by_hash(&self, hash: [u8; 32]) -> Result<Option<Token>, StoreError> {
        match self.token_hashes.get(hash).map_err(backend)? {
            Some(id) => Self::get(&self.tokens, "token", id),
            None => Ok(None),
        }
    }

    fn sync_revoke_token(&self, id: &str, at: Millis) -> Result<Token, StoreError> {
        let _guard = self.lock();
        let mut token: Token =
            Self::get(&self.tokens, "token", id)?.ok_or_else(|| StoreError::NoToken(id.into()))?;
        if token.revoked.is_none() {
            token.revoked = Some(at);
        }
        self.tokens.insert(id, encode(&token)?).map_err(backend)?;
        self.flush()?;
        Ok(token)
    }

    fn sync_audit(&self, mut entry: AuditEntry) -> Result<AuditEntry, StoreError> {
        let _guard = self.lock();
        entry.seq = self.next("audit")?;
        self.audit
            .insert(be(entry.seq), encode(&entry)?)
            .map_err(backend)?;
        self.flush()?;
        Ok(entry)
    }
}

/// How many watch runs each target keeps (the oldest are dropped).
pub const KEEP_WATCHES: usize = 200;

impl SledStore {
    fn sync_open_watch(&self, new: NewWatch, at: Millis) -> Result<WatchRun, StoreError> {
        let _guard = self.lock();
        let id = self.next("watch")?;
        let run = WatchRun::new(id, new, at);
        let prefix = watch_prefix(&run.target);
        let mut listed: Vec<sled::IVec> = self
            .watches_by_target
            .scan_prefix(&prefix)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(backend)?;
        // Keys sort by number: the oldest first.
        let excess = (listed.len() + 1).saturating_sub(KEEP_WATCHES);
        listed.truncate(excess);
        let record = encode(&run)?;
        let mut key = prefix;
        key.extend_from_slice(&be(id));
        (&self.watches, &self.watches_by_target)
            .transaction(|(watches, by_target)| {
                watches.insert(&be(id), record.as_slice())?;
                by_target.insert(key.as_slice(), &[])?;
                for old in &listed {
                    by_target.remove(old)?;
                    if let Some(number) = old.get(old.len().saturating_sub(8)..) {
                        watches.remove(number)?;
                    }
                }
                Ok(())
            })
            .map_err(embedded_db::storage_error)
            .map_err(backend)?;
        self.flush()?;
        Ok(run)
    }

    /// Changes run `id` by `change`, atomically, durably.
    fn change_watch(
        &self,
        id: u64,
        change: impl FnOnce(&mut WatchRun) -> Result<(), WatchError>,
    ) -> Result<WatchRun, StoreError> {
        let _guard = self.lock();
        let mut run: WatchRun =
            Self::get(&self.watches, "watch run", be(id))?.ok_or(WatchError::NotFound(id))?;
        change(&mut run)?;
        self.watches
            .insert(be(id), encode(&run)?)
            .map_err(backend)?;
        self.flush()?;
        Ok(run)
    }

    fn sync_watches(&self, target: &TargetName, limit: usize) -> Result<Vec<WatchRun>, StoreError> {
        self.watches_by_target
            .scan_prefix(watch_prefix(target))
            .keys()
            .rev()
            .take(limit)
            .map(|key| {
                let key = key.map_err(backend)?;
                let number = key.get(key.len().saturating_sub(8)..).unwrap_or_default();
                let id = id_of(number, "watch run key")?.0;
                Self::get(&self.watches, "watch run", be(id))?.ok_or(StoreError::Corrupt {
                    what: "watch run index",
                    message: format!("it lists run {id}, which is missing"),
                })
            })
            .collect()
    }
}

/// The prefix of a target's entries in `watches_by_target`.
fn watch_prefix(target: &TargetName) -> Vec<u8> {
    let mut key = target.as_str().as_bytes().to_vec();
    key.push(0);
    key
}

impl Store for SledStore {
    fn put_target(&self, target: Target, replace: bool) -> StoreFuture<'_, ()> {
        ready(self.sync_put_target(target, replace))
    }

    fn target(&self, name: &TargetName) -> StoreFuture<'_, Option<Target>> {
        ready(Self::get(&self.targets, "target", name.as_str()))
    }

    fn targets(&self) -> StoreFuture<'_, Vec<Target>> {
        ready(Self::all(&self.targets, "target"))
    }

    fn put_instance(&self, record: InstanceRecord) -> StoreFuture<'_, ()> {
        ready(encode(&record).and_then(|bytes| {
            self.instances
                .insert(record.name.as_str(), bytes)
                .map(drop)
                .map_err(backend)
        }))
    }

    fn instances(&self) -> StoreFuture<'_, Vec<InstanceRecord>> {
        ready(Self::all(&self.instances, "instance"))
    }

    fn enqueue(&self, new: NewDeployment, at: Millis) -> StoreFuture<'_, Deployment> {
        ready(self.sync_enqueue(new, at))
    }

    fn claim_next(&self, max_running: usize, at: Millis) -> StoreFuture<'_, Option<Deployment>> {
        ready(self.sync_claim_next(max_running, at))
    }

    fn to_front(&self, id: DeploymentId) -> StoreFuture<'_, ()> {
        ready(self.sync_to_front(id))
    }

    fn transition(
        &self,
        id: DeploymentId,
        transition: Transition,
        failure: Option<String>,
        at: Millis,
    ) -> StoreFuture<'_, Deployment> {
        ready(self.sync_transition(id, transition, failure, at))
    }

    fn request_cancel(&self, id: DeploymentId) -> StoreFuture<'_, Deployment> {
        ready(self.update(id, |d| {
            if d.state != DeploymentState::Running {
                return Err(StoreError::Transition {
                    id,
                    source: crate::deployment::TransitionError {
                        from: d.state,
                        transition: Transition::Cancel,
                    },
                });
            }
            d.cancel_requested = true;
            Ok(())
        }))
    }

    fn put_run(
        &self,
        id: DeploymentId,
        instance: InstanceName,
        run: InstanceRun,
    ) -> StoreFuture<'_, ()> {
        // Not flushed at once (sled flushes within half a second): a part
        // lost to a crash is asked of its shell again, which answers from its
        // own record of the deployment.
        ready((|| {
            let _guard = self.lock();
            self.load_main(id)?;
            self.runs
                .insert(part_key(id, &instance), encode(&run)?)
                .map_err(backend)?;
            Ok(())
        })())
    }

    fn put_plans(
        &self,
        id: DeploymentId,
        plans: BTreeMap<InstanceName, UpgradePlan>,
    ) -> StoreFuture<'_, ()> {
        ready((|| {
            let _guard = self.lock();
            self.load_main(id)?;
            let mut batch = sled::Batch::default();
            for (instance, plan) in &plans {
                batch.insert(part_key(id, instance), encode(plan)?);
            }
            self.plans.apply_batch(batch).map_err(backend)
        })())
    }

    fn set_stuck(&self, id: DeploymentId, stuck: bool, at: Millis) -> StoreFuture<'_, ()> {
        ready(
            self.update(id, |d| {
                d.stuck = stuck && d.state == DeploymentState::Running;
                if !stuck {
                    d.last_progress = Some(at);
                }
                Ok(())
            })
            .map(drop),
        )
    }

    fn deployment(&self, id: DeploymentId) -> StoreFuture<'_, Option<Deployment>> {
        ready(match self.load(id) {
            Ok(d) => Ok(Some(d)),
            Err(StoreError::NoDeployment(_)) => Ok(None),
            Err(e) => Err(e),
        })
    }

    fn deployments(&self, filter: DeploymentFilter) -> StoreFuture<'_, Vec<Deployment>> {
        ready(self.sync_deployments(&filter))
    }

    fn running(&self) -> StoreFuture<'_, Vec<Deployment>> {
        ready(self.sync_running())
    }

    fn queue(&self) -> StoreFuture<'_, Vec<Deployment>> {
        ready(self.sync_queue())
    }

    fn prune(&self, target: &TargetName, keep: usize) -> StoreFuture<'_, usize> {
        ready(self.sync_prune(target, keep))
    }

    fn append_events(
        &self,
        id: DeploymentId,
        events: Vec<(Millis, Option<InstanceName>, EventKind)>,
    ) -> StoreFuture<'_, Vec<Event>> {
        ready(self.sync_append(id, events))
    }

    fn events(&self, id: DeploymentId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Event>> {
        ready(self.sync_events(id, after, limit))
    }

    fn put_user(&self, user: User, replace: bool) -> StoreFuture<'_, ()> {
        ready(self.sync_put_user(user, replace))
    }

    fn user(&self, name: &UserName) -> StoreFuture<'_, Option<User>> {
        ready(Self::get(&self.users, "user", name.as_str()))
    }

    fn users(&self) -> StoreFuture<'_, Vec<User>> {
        ready(Self::all(&self.users, "user"))
    }

    fn remove_user(&self, name: &UserName, at: Millis) -> StoreFuture<'_, ()> {
        ready(self.sync_remove_user(name, at))
    }

    fn create_session(&self, session: Session) -> StoreFuture<'_, ()> {
        ready(self.sync_create_session(session))
    }

    fn session(&self, hash: [u8; 32]) -> StoreFuture<'_, Option<Session>> {
        ready(Self::get(&self.sessions, "session", hash))
    }

    fn touch_session(&self, hash: [u8; 32], at: Millis) -> StoreFuture<'_, ()> {
        ready(self.sync_touch_session(hash, at))
    }

    fn delete_session(&self, hash: [u8; 32]) -> StoreFuture<'_, bool> {
        ready(self.sync_delete_session(hash))
    }

    fn delete_user_sessions(&self, user: &UserName) -> StoreFuture<'_, usize> {
        ready(self.sync_delete_user_sessions(user))
    }

    fn put_token(&self, token: Token) -> StoreFuture<'_, ()> {
        ready(self.sync_put_token(token))
    }

    fn token_by_hash(&self, hash: [u8; 32]) -> StoreFuture<'_, Option<Token>> {
        ready(self.sync_token_by_hash(hash))
    }

    fn tokens(&self) -> StoreFuture<'_, Vec<Token>> {
        ready(Self::all(&self.tokens, "token"))
    }

    fn revoke_token(&self, id: &str, at: Millis) -> StoreFuture<'_, Token> {
        ready(self.sync_revoke_token(id, at))
    }

    fn cursor(&self, name: &str) -> StoreFuture<'_, Option<u64>> {
        let key = format!("cursor/{name}");
        ready(
            self.meta
                .get(key.as_bytes())
                .map_err(backend)
                .and_then(|v| v.map(|v| id_of(&v, "cursor").map(|id| id.0)).transpose()),
        )
    }

    fn put_cursor(&self, name: &str, position: u64) -> StoreFuture<'_, ()> {
        let key = format!("cursor/{name}");
        ready(
            self.meta
                .insert(key.as_bytes(), &be(position))
                .map(drop)
                .map_err(backend),
        )
    }

    fn audit(&self, entry: AuditEntry) -> StoreFuture<'_, AuditEntry> {
        ready(self.sync_audit(entry))
    }

    fn audit_log(&self, after: u64, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>> {
        ready(
            self.audit
                .range(be(after.saturating_add(1))..)
                .values()
                .take(limit)
                .map(|v| decode("audit entry", &v.map_err(backend)?))
                .collect(),
        )
    }

    fn audit_newest(&self, before: Option<u64>, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>> {
        let end = be(before.unwrap_or(u64::MAX));
        ready(
            self.audit
                .range(..end)
                .values()
                .rev()
                .take(limit)
                .map(|v| decode("audit entry", &v.map_err(backend)?))
                .collect(),
        )
    }

    fn open_watch(&self, new: NewWatch, at: Millis) -> StoreFuture<'_, WatchRun> {
        ready(self.sync_open_watch(new, at))
    }

    fn watch_cycle(&self, id: u64, cycle: WatchCycle) -> StoreFuture<'_, WatchRun> {
        ready(self.change_watch(id, |run| run.add(cycle).map(drop)))
    }

    fn end_watch(&self, id: u64, at: Millis) -> StoreFuture<'_, WatchRun> {
        ready(self.change_watch(id, |run| {
            run.end(at);
            Ok(())
        }))
    }

    fn watch(&self, id: u64) -> StoreFuture<'_, Option<WatchRun>> {
        ready(Self::get(&self.watches, "watch run", be(id)))
    }

    fn watches(&self, target: &TargetName, limit: usize) -> StoreFuture<'_, Vec<WatchRun>> {
        ready(self.sync_watches(target, limit))
    }
}
