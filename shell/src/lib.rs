//! molt's shell: the agent on every instance.
//!
//! Its modules:
//! - [`release`]: the release directories an upgrade makes — a copy of the previous
//!   release of a service (build outputs and timestamps included, so builds stay
//!   incremental) with the diff to the new commit applied, sealed by an atomic
//!   rename and never modified afterwards;
//! - [`build`]: a service's build command with its environment, timeout and log;
//! - [`install`]: upgrade steps 1–4 for one service (diff, fetch only what the
//!   instance's blob cache lacks, make the release, build, seal);
//! - [`health`]: HTTP, TCP and command probes, and waiting for a starting process;
//! - [`process`]: starting a service process with its log (rotated), stopping it
//!   with its stop signal then SIGKILL, and the restart policy with backoff;
//! - [`state`]: the recorded installed state and generation history in sled,
//!   replaced atomically;
//! - [`durable`]: small files written so that a power loss leaves them whole or
//!   absent (temporary file, fsync, rename, fsync of the directory);
//! - [`supervisor`]: one task per service process that restarts it by its policy
//!   and publishes its status on a `watch` channel;
//!
//! The public ports in front of the services (the routing table, the HTTP and
//! TCP fronts, their drain counters) are the `front` crate's; the shell opens
//! them and moves their routes.
//!
//! - [`instance`]: the running generation and the in-place upgrade that ties the
//!   above together — install every changed service, start and health-check each
//!   new process, switch its fronts, roll everything back on any failure, drain and
//!   stop the old processes, and only then record the new state; reopening starts
//!   what the recorded state says;
//! - [`service`]: the shell's command service over QUIC (upgrade, plan, status,
//!   logs, rollback, pull), one upgrade at a time with the others queued;
//! - [`attach`]: the connection a shell dials to its portal: registering, serving
//!   the portal's commands on the streams it opens, reconnecting with backoff;
//! - [`deployment`]: the outcomes of the portal's deployments, so that an
//!   upgrade or rollback asked again with the same id is done once;
//! - [`crash`]: crash points that let tests `kill -9` the shell at a chosen step.
//!
//! - [`plugin`]: plugin services, served inside the shell and swapped with
//!   their state.
//!
//! - [`keeper`]: the process that holds an instance's services, so they
//!   outlive the shell that started them when a new one takes over, and stop
//!   when no shell is left;
//! - [`fdpass`]: messages carrying open descriptors over a unix socket;
//! - [`takeover`]: what one shell hands the shell that takes over from it
//!   (the versioned state and its messages).

pub mod attach;
pub mod build;
pub mod cache;
pub mod crash;
pub mod deployment;
pub mod durable;
pub mod env;
pub mod executor;
pub mod fdpass;
pub mod fsck;
pub mod health;
pub mod install;
pub mod instance;
pub mod keeper;
pub mod lifecycle;
pub mod plan;
pub mod plugin;
pub mod process;
pub mod reaper;
pub mod release;
pub mod service;
pub mod state;
pub mod supervisor;
pub mod takeover;
