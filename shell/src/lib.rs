//! molt's shell: the agent on every instance.
//!
//! Built so far: [`release`], the release directories an upgrade makes — a copy of
//! the previous release of a service (build outputs and timestamps included, so
//! builds stay incremental) with the diff to the new commit applied, sealed by an
//! atomic rename and never modified afterwards. The local state, builds, the
//! supervisor, the front proxy and the upgrade itself come next.

pub mod build;
pub mod install;
pub mod release;
