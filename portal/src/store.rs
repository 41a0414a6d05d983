//! The portal's records behind one narrow trait, so the embedded sled store
//! ([`sled::SledStore`]) can be replaced by PostgreSQL without touching the rest.
//!
//! Every method is one atomic operation of the store, and the operations that
//! decide something are the store's to decide, not a read-then-write in the
//! caller:
//!
//! - [`Store::claim_next`] picks the next queued deployment whose target has
//!   none running, within the portal-wide cap, and marks it running — in SQL one
//!   `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED)`;
//! - [`Store::transition`] applies the deployment state machine to the state it
//!   finds (a compare-and-set), so two writers can never both finish one;
//! - [`Store::put_target`] refuses an instance that another target holds.
//!
//! Methods return boxed futures so the trait is object safe (`Arc<dyn Store>`)
//! and an implementation may be truly asynchronous.

pub mod sled;

use std::future::Future;
use std::pin::Pin;

use image_spec::{InstanceName, TargetName, UserName};
use wire::portal::DeploymentId;

use crate::auth::{AuditEntry, Session, Token, User};
use crate::deployment::{
    Deployment, DeploymentState, Event, InstanceRun, Millis, NewDeployment, Transition,
    TransitionError, Trigger,
};
use crate::target::{InstanceRecord, Target};
use crate::watch::{NewWatch, WatchCycle, WatchError, WatchRun};
use wire::plan::UpgradePlan;

/// What a store method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("portal database: {0}")]
    Backend(String),
    /// A record could not be read back.
    #[error("portal database: a stored {what} cannot be read: {message}")]
    Corrupt {
        /// Which kind of record.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// A target of that name exists.
    #[error("a target named `{0}` exists")]
    TargetExists(TargetName),
    /// No such target.
    #[error("no target named `{0}`")]
    NoTarget(TargetName),
    /// The instance belongs to another target.
    #[error(
        "instance `{instance}` belongs to target `{target}`; an instance belongs to one target"
    )]
    InstanceTaken {
        /// The instance.
        instance: InstanceName,
        /// The target that has it.
        target: TargetName,
    },
    /// No such deployment.
    #[error("no deployment {0}")]
    NoDeployment(DeploymentId),
    /// The state machine refused the move.
    #[error("deployment {id}: {source}")]
    Transition {
        /// The deployment.
        id: DeploymentId,
        /// Why.
        source: TransitionError,
    },
    /// A user of that name exists.
    #[error("a user named `{0}` exists")]
    UserExists(UserName),
    /// No such user.
    #[error("no user named `{0}`")]
    NoUser(UserName),
    /// No such token.
    #[error("no token `{0}`")]
    NoToken(String),
    /// A watch run refused a cycle or does not exist.
    #[error(transparent)]
    Watch(#[from] WatchError),
}

/// Which deployments a listing wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentFilter {
    /// Only this target's.
    pub target: Option<TargetName>,
    /// Only in this state.
    pub state: Option<DeploymentState>,
    /// Only asked for by this user.
    pub who: Option<UserName>,
    /// Only of this image (by name).
    pub image: Option<String>,
    /// Only rollbacks (`Some(true)`) or only manual ones (`Some(false)`).
    pub rollback: Option<bool>,
    /// Only created at or after this time.
    pub since: Option<Millis>,
    /// Only created before this time.
    pub until: Option<Millis>,
    /// Only with ids below this (the page before).
    pub before: Option<DeploymentId>,
    /// At most this many (newest first).
    pub limit: usize,
}

impl DeploymentFilter {
    /// Does `d` pass the filter (the page bounds aside)?
    pub fn matches(&self, d: &Deployment) -> bool {
        self.target.as_ref().is_none_or(|t| *t == d.target)
            && self.state.is_none_or(|s| s == d.state)
            && self.who.as_ref().is_none_or(|w| *w == d.requested_by)
            && self
                .image
                .as_ref()
                .is_none_or(|i| i == d.image.name.as_str())
            && self
                .rollback
                .is_none_or(|r| r == matches!(d.trigger, Trigger::Rollback { .. }))
            && self.since.is_none_or(|s| d.created >= s)
            && self.until.is_none_or(|u| d.created < u)
            && self.before.is_none_or(|b| d.id < b)
    }
}

/// The portal's records (see the module docs).
pub trait Store: Send + Sync + 'static {
    /// Creates a target (`TargetExists`) or, with `replace`, changes an existing
    /// one (`NoTarget`); refuses instances another target holds.
    fn put_target(&self, target: Target, replace: bool) -> StoreFuture<'_, ()>;
    /// One target.
    fn target(&self, name: &TargetName) -> StoreFuture<'_, Option<Target>>;
    /// Every target, by name.
    fn targets(&self) -> StoreFuture<'_, Vec<Target>>;

    /// Records what is known of an instance.
    fn put_instance(&self, record: InstanceRecord) -> StoreFuture<'_, ()>;
    /// Every known instance, by name.
    fn instances(&self) -> StoreFuture<'_, Vec<InstanceRecord>>;

    /// Queues a new deployment, giving it the next id.
    fn enqueue(&self, new: NewDeployment, at: Millis) -> StoreFuture<'_, Deployment>;
    /// Atomically takes the oldest queued deployment (the ones moved to the
    /// front first) whose target has none running, if fewer than `max_running`
    /// run, and marks it running.
    fn claim_next(&self, max_running: usize, at: Millis) -> StoreFuture<'_, Option<Deployment>>;
    /// Moves a queued deployment to the front of the queue.
    fn to_front(&self, id: DeploymentId) -> StoreFuture<'_, ()>;
    /// Applies a move of the state machine, atomically, with `failure` as the
    /// reason when given; returns the record after it.
    fn transition(
        &self,
        id: DeploymentId,
        transition: Transition,
        failure: Option<String>,
        at: Millis,
    ) -> StoreFuture<'_, Deployment>;
    /// Marks a running deployment to be cancelled before its next instance.
    fn request_cancel(&self, id: DeploymentId) -> StoreFuture<'_, Deployment>;
    /// Records an instance's part of a running deployment.
    fn put_run(
        &self,
        id: DeploymentId,
        instance: InstanceName,
        run: InstanceRun,
    ) -> StoreFuture<'_, ()>;
    /// Records the plans shown before the deployment moved.
    fn put_plans(
        &self,
        id: DeploymentId,
        plans: std::collections::BTreeMap<InstanceName, UpgradePlan>,
    ) -> StoreFuture<'_, ()>;
    /// Marks progress (`stuck: false`, last progress now) or stuck.
    fn set_stuck(&self, id: DeploymentId, stuck: bool, at: Millis) -> StoreFuture<'_, ()>;
    /// One deployment.
    fn deployment(&self, id: DeploymentId) -> StoreFuture<'_, Option<Deployment>>;
    /// Deployments matching `filter`, newest first.
    fn deployments(&self, filter: DeploymentFilter) -> StoreFuture<'_, Vec<Deployment>>;
    /// Every running deployment.
    fn running(&self) -> StoreFuture<'_, Vec<Deployment>>;
    /// Every queued deployment, in the order they will run.
    fn queue(&self) -> StoreFuture<'_, Vec<Deployment>>;
    /// Drops a target's finished deployments beyond the newest `keep`.
    fn prune(&self, target: &TargetName, keep: usize) -> StoreFuture<'_, usize>;

    /// Appends events to a deployment's stream, numbering them; returns them.
    fn append_events(
        &self,
        id: DeploymentId,
        events: Vec<(Millis, Option<InstanceName>, crate::deployment::EventKind)>,
    ) -> StoreFuture<'_, Vec<Event>>;
    /// A deployment's events after `after`, at most `limit`.
    fn events(&self, id: DeploymentId, after: u64, limit: usize) -> StoreFuture<'_, Vec<Event>>;

    /// Adds a user (`UserExists`) or, with `replace`, changes one; a change
    /// of their grant or password ends their sessions in the same operation.
    fn put_user(&self, user: User, replace: bool) -> StoreFuture<'_, ()>;
    /// One user.
    fn user(&self, name: &UserName) -> StoreFuture<'_, Option<User>>;
    /// Every user.
    fn users(&self) -> StoreFuture<'_, Vec<User>>;
    /// Removes a user, revokes their tokens and ends their sessions.
    fn remove_user(&self, name: &UserName, at: Millis) -> StoreFuture<'_, ()>;

    /// Opens a browser session (and drops the sessions that have expired).
    fn create_session(&self, session: Session) -> StoreFuture<'_, ()>;
    /// The session whose id hashes to `hash`, expired or not.
    fn session(&self, hash: [u8; 32]) -> StoreFuture<'_, Option<Session>>;
    /// Marks a session used at `at` (its idle expiry counts from there).
    fn touch_session(&self, hash: [u8; 32], at: Millis) -> StoreFuture<'_, ()>;
    /// Ends a session; `false` when there was none.
    fn delete_session(&self, hash: [u8; 32]) -> StoreFuture<'_, bool>;
    /// Ends every session of a user; how many there were.
    fn delete_user_sessions(&self, user: &UserName) -> StoreFuture<'_, usize>;

    /// Stores a token.
    fn put_token(&self, token: Token) -> StoreFuture<'_, ()>;
    /// The token whose secret hashes to `hash`.
    fn token_by_hash(&self, hash: [u8; 32]) -> StoreFuture<'_, Option<Token>>;
    /// Every token.
    fn tokens(&self) -> StoreFuture<'_, Vec<Token>>;
    /// Revokes a token by its id.
    fn revoke_token(&self, id: &str, at: Millis) -> StoreFuture<'_, Token>;

    /// A named position in a stream the portal follows (the repository's ref
    /// log), if one was stored.
    fn cursor(&self, name: &str) -> StoreFuture<'_, Option<u64>>;
    /// Stores a named position.
    fn put_cursor(&self, name: &str, position: u64) -> StoreFuture<'_, ()>;

    /// Appends to the audit log, numbering the entry.
    fn audit(&self, entry: AuditEntry) -> StoreFuture<'_, AuditEntry>;
    /// The audit log's entries after `after`, at most `limit`.
    fn audit_log(&self, after: u64, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>>;
    /// The audit log's entries before `before` (`None`: from the newest),
    /// newest first, at most `limit`: its pages, as people read it.
    fn audit_newest(&self, before: Option<u64>, limit: usize) -> StoreFuture<'_, Vec<AuditEntry>>;

    /// Opens a watch run, numbered by the store ([`crate::watch`]).
    fn open_watch(&self, new: NewWatch, at: Millis) -> StoreFuture<'_, WatchRun>;
    /// Adds a cycle to an open run, atomically; an ended one refuses it
    /// (`Watch(Ended)`).
    fn watch_cycle(&self, id: u64, cycle: WatchCycle) -> StoreFuture<'_, WatchRun>;
    /// Ends a run (an ended one stays as it was).
    fn end_watch(&self, id: u64, at: Millis) -> StoreFuture<'_, WatchRun>;
    /// One run.
    fn watch(&self, id: u64) -> StoreFuture<'_, Option<WatchRun>>;
    /// A target's runs, newest first, at most `limit`.
    fn watches(&self, target: &TargetName, limit: usize) -> StoreFuture<'_, Vec<WatchRun>>;
}
