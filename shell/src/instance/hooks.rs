//! A service's hooks: `pre_swap` before its new release takes traffic (a
//! failure aborts the upgrade), `post_swap` after (a failure is reported and
//! kept). Both strategies run them; a hook runs in the new release directory
//! with the service's environment, the ports it serves on (`PORT`,
//! `MOLT_PORT_*`) and its data directory (`MOLT_DATA`) — the environment of
//! [`crate::env`], as the process has it — its output in
//! `ROOT/logs/<service>/<commit>.<hook>.log`. A plugin's hooks see the ports
//! and data of the host that serves it.

use std::collections::BTreeMap;
use std::path::Path;

use image_spec::manifest::TimedCommand;
use image_spec::{ServiceManifest, ServiceName};

use super::{Installed, Instance, Progress, Service, UpgradeError, read_manifest};

impl Instance {
    /// Runs the `pre_swap` hook of the plugin release `installed`, if it has
    /// one, with the ports and data of the host that will swap it in.
    pub(super) async fn plugin_pre_swap(
        &self,
        name: &ServiceName,
        installed: &Installed,
        progress: Progress<'_>,
    ) -> Result<(), UpgradeError> {
        let manifest = read_manifest(&installed.dir)?;
        let host = self
            .services
            .get(name)
            .ok_or_else(|| UpgradeError::Manifest(format!("service `{name}` is not running")))?;
        let target = HookTarget {
            manifest: &manifest,
            installed,
            ports: &host.ports,
            data: host.data.as_deref(),
        };
        self.pre_swap(name, target, progress).await
    }

    /// Runs `target`'s `pre_swap` hook, if it has one.
    pub(super) async fn pre_swap(
        &self,
        name: &ServiceName,
        target: HookTarget<'_>,
        progress: Progress<'_>,
    ) -> Result<(), UpgradeError> {
        let Some(hook) = &target.manifest.hooks().pre_swap else {
            return Ok(());
        };
        progress(Some(name), "running its pre_swap hook");
        self.run_hook(name, target, hook, "pre_swap").await
    }

    /// Runs the `post_swap` hook of `name`, if it has one. The caller reports a
    /// failure; the traffic has moved already.
    pub(super) async fn post_swap_one(&self, name: &ServiceName) -> Result<(), UpgradeError> {
        let Some(service) = self.services.get(name) else {
            return Ok(());
        };
        let Some(hook) = &service.manifest.hooks().post_swap else {
            return Ok(());
        };
        self.run_hook(name, service.hook_target(), hook, "post_swap")
            .await
    }

    /// Runs a hook of a service in its release directory, with the service's
    /// environment, its new process's ports and its data directory.
    async fn run_hook(
        &self,
        name: &ServiceName,
        target: HookTarget<'_>,
        hook: &TimedCommand,
        which: &str,
    ) -> Result<(), UpgradeError> {
        let env = crate::env::ServiceEnv {
            instance: &self.config.name,
            service: name,
            commit: target.installed.commit,
            manifest: target.manifest,
            ports: Some(target.ports),
            data: target.data,
        }
        .vars();
        let log = self
            .config
            .root
            .join("logs")
            .join(name.as_str())
            .join(format!("{}.{which}.log", target.installed.commit.short(12)));
        crate::build::run(hook, &target.installed.dir, &env, &log)
            .await
            .map_err(|source| UpgradeError::Hook {
                service: name.clone(),
                hook: which.to_owned(),
                source: Box::new(source),
            })
    }
}

/// What a hook runs against: a service's new release and manifest, the ports
/// it serves on, and its data directory.
#[derive(Clone, Copy)]
pub(super) struct HookTarget<'a> {
    manifest: &'a ServiceManifest,
    installed: &'a Installed,
    ports: &'a BTreeMap<String, u16>,
    data: Option<&'a Path>,
}

impl Service {
    pub(super) fn hook_target(&self) -> HookTarget<'_> {
        HookTarget {
            manifest: &self.manifest,
            installed: &self.installed,
            ports: &self.ports,
            data: self.data.as_deref(),
        }
    }
}
