//! The `shadow` strategy: the whole new generation beside the running one.
//!
//! Every changed service's new process starts on fresh internal ports while the
//! running generation keeps all the traffic. Only when every one of them is
//! healthy, and every `pre_swap` hook (migrations, say) has passed against the
//! new releases, does the cutover happen: one change of the instance's routing
//! table moves every service at once. A plugin's `pre_swap` hook runs before the
//! cutover too, in its new release, with the ports and data of the host that
//! swaps it in. A service with `overlap = false` cannot run twice, so it is
//! stopped and started at the cutover itself while its fronts hold new
//! connections; its hook runs once its new process is healthy and before it
//! takes a request. Hooks get `PORT`, `MOLT_PORT_*` and `MOLT_DATA` as the
//! service does. Then the old generation drains (requests in
//! flight finish on it, within each service's stop grace) and stops; its
//! releases stay on disk for a rollback.
//!
//! With `full` (`shadow-full`), the unchanged services start as fresh processes
//! too, and every started service runs on a copy of its data directory
//! (`ROOT/data/<service>/g<generation>`, copied with fs_extra, progress
//! reported), so the new generation is a complete copy of the instance and its
//! `pre_swap` hooks (migrations) never touch the data the running generation
//! serves from. A service that cannot overlap is copied after its old process
//! stopped, so its copy misses no write. A failure before the cutover stops the
//! new processes and leaves the old generation serving, untouched; a failure of
//! a held service after it switches everything back.

use image_spec::ServiceName;
use tracing::warn;

use std::path::{Path, PathBuf};

use super::{
    Installed, Instance, Phase, Progress, Service, UpgradeError, UpgradeReport, read_manifest,
    routes,
};

impl Instance {
    /// Step 5 with the `shadow` strategy (see the module docs).
    pub(super) async fn switch_shadow(
        &mut self,
        mut fresh: Vec<(ServiceName, Installed)>,
        full: bool,
        report: &mut UpgradeReport,
        progress: Progress<'_>,
    ) -> Result<(), UpgradeError> {
        let number = self.recorded()?.1 + 1;
        self.phase(number, Phase::Starting);
        progress(
            None,
            &format!("generation {number}: starting beside the running one"),
        );
        if full {
            // The unchanged services start afresh too (plugins keep theirs).
            let unchanged: Vec<(ServiceName, Installed)> = self
                .services
                .iter()
                .filter(|(n, s)| {
                    s.process.plugin().is_none() && !fresh.iter().any(|(f, _)| f == *n)
                })
                .map(|(n, s)| (n.clone(), s.installed.clone()))
                .collect();
            report
                .unchanged
                .retain(|n| !unchanged.iter().any(|(u, _)| u == n));
            fresh.extend(unchanged);
            fresh.sort_by(|a, b| a.0.cmp(&b.0));
        }

        // Start every service that may overlap; hold back those that may not.
        let mut started: Vec<(ServiceName, Service)> = Vec::new();
        let mut held: Vec<(ServiceName, Installed)> = Vec::new();
        let mut plugins: Vec<(ServiceName, Installed)> = Vec::new();
        for (name, installed) in fresh {
            if self.swaps_in_place(&name, &installed) {
                // Swapped inside its host at the cutover: a pause of microseconds.
                plugins.push((name, installed));
                continue;
            }
            if self
                .services
                .get(&name)
                .is_some_and(|s| !s.manifest.overlap())
            {
                held.push((name, installed));
                continue;
            }
            progress(
                Some(&name),
                "starting in the new generation, waiting until healthy",
            );
            let data = match self
                .data_copy(full, number, &name, &installed, progress)
                .await
            {
                Ok(d) => d,
                Err(e) => return Err(self.abandon(number, started, e, progress).await),
            };
            match self.start_on(&name, installed, data).await {
                Ok(service) => started.push((name, service)),
                Err(e) => return Err(self.abandon(number, started, e, progress).await),
            }
        }
        self.phase(number, Phase::Healthy);
        progress(None, &format!("generation {number}: healthy"));

        // Hooks that must pass before traffic moves: the started services',
        // against their new processes; the plugins', in their new releases
        // against the host that serves them.
        for (name, service) in &started {
            if let Err(e) = self.pre_swap(name, service.hook_target(), progress).await {
                return Err(self.abandon(number, started, e, progress).await);
            }
        }
        for (name, installed) in &plugins {
            if let Err(e) = self.plugin_pre_swap(name, installed, progress).await {
                return Err(self.abandon(number, started, e, progress).await);
            }
        }

        // The cutover: every started service, and the held ones set to hold, in
        // one change of the routing table.
        let mut changes = Vec::new();
        for (name, service) in &started {
            changes.extend(routes(name, service));
        }
        for (name, _) in &held {
            if let Some(old) = self.services.get(name) {
                changes.extend(routes(name, old).into_iter().map(|(k, _)| (k, None)));
            }
        }
        self.router.set(changes);
        let mut switched = Vec::new();
        for (name, service) in started {
            if let Err(e) = self.open_fronts(&name, &service).await {
                warn!(service = %name, error = %e, "could not open a new port");
                switched.push((name.clone(), self.services.insert(name, service)));
                return Err(self
                    .undo_cutover(number, switched, Vec::new(), e, progress)
                    .await);
            }
            report.restarted.push(name.clone());
            let old = self.services.insert(name.clone(), service);
            switched.push((name, old));
        }
        let mut swapped = Vec::new();
        for (name, installed) in plugins {
            progress(Some(&name), "swapping the plugin in place, its state kept");
            match self.swap_plugin(&name, installed).await {
                Ok(previous) => {
                    report.restarted.push(name.clone());
                    swapped.push((name, previous));
                }
                Err(e) => {
                    self.unswap_plugins(swapped).await;
                    return Err(self
                        .undo_cutover(number, switched, Vec::new(), e, progress)
                        .await);
                }
            }
        }
        crate::crash::point("after-switch");
        progress(
            None,
            &format!("generation {number}: cut over, every service at once"),
        );

        // Services that cannot overlap: stop the old, start the new, while held.
        let mut stopped_old = Vec::new();
        for (name, installed) in held {
            if let Some(old) = self.services.remove(&name) {
                progress(
                    Some(&name),
                    "stopping the old process (no overlap), holding its connections",
                );
                old.process.stop().await;
                stopped_old.push((name.clone(), old.installed));
            }
            progress(Some(&name), "starting, waiting until healthy");
            let data = match self
                .data_copy(full, number, &name, &installed, progress)
                .await
            {
                Ok(d) => d,
                Err(e) => {
                    return Err(self
                        .undo_cutover(number, switched, stopped_old, e, progress)
                        .await);
                }
            };
            match self.start_on(&name, installed, data).await {
                Ok(service) => {
                    // Its hook runs once it is healthy, before it takes traffic.
                    let ready = match self.pre_swap(&name, service.hook_target(), progress).await {
                        Ok(()) => self.expose(&name, &service).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = ready {
                        switched.push((name.clone(), self.services.insert(name, service)));
                        return Err(self
                            .undo_cutover(number, switched, stopped_old, e, progress)
                            .await);
                    }
                    report.restarted.push(name.clone());
                    switched.push((name.clone(), self.services.insert(name, service)));
                }
                Err(e) => {
                    return Err(self
                        .undo_cutover(number, switched, stopped_old, e, progress)
                        .await);
                }
            }
        }
        self.phase(number, Phase::Serving);

        // The old generation drains, then stops; its releases stay.
        let previous = number - 1;
        if previous > 0 {
            self.phase(previous, Phase::Draining);
        }
        for (name, old) in switched {
            if let Some(old) = old {
                progress(Some(&name), "draining and stopping the old process");
                self.drain(&name, &old).await;
                old.process.stop().await;
            }
        }
        if previous > 0 {
            self.phase(previous, Phase::Stopped);
        }

        self.post_swap(&report.restarted, progress).await;
        Ok(())
    }

    /// With `full`, copies the service's data directory (if it declares data)
    /// for generation `number` and returns the copy; otherwise `None` (the
    /// service keeps its data directory).
    async fn data_copy(
        &self,
        full: bool,
        number: u64,
        name: &ServiceName,
        installed: &Installed,
        progress: Progress<'_>,
    ) -> Result<Option<PathBuf>, UpgradeError> {
        if !full || read_manifest(&installed.dir)?.data().is_empty() {
            return Ok(None);
        }
        let from = self.data_dir(name);
        let to = self
            .config
            .root
            .join("data")
            .join(name.as_str())
            .join(format!("g{number}"));
        progress(Some(name), &format!("copying its data to {}", to.display()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (src, dst) = (from.clone(), to.clone());
        let copy = tokio::task::spawn_blocking(move || copy_data(&src, &dst, &tx));
        tokio::pin!(copy);
        let mut shown = None;
        let copied = loop {
            tokio::select! {
                done = &mut copy => break done,
                Some((bytes, total)) = rx.recv() => {
                    let tenth = bytes * 10 / total.max(1);
                    if shown != Some(tenth) {
                        shown = Some(tenth);
                        progress(Some(name), &format!("copying data: {bytes} of {total} bytes"));
                    }
                }
            }
        };
        let total = copied
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(|source| UpgradeError::Io {
                path: to.clone(),
                source,
            })?;
        progress(Some(name), &format!("data copied: {total} bytes"));
        Ok(Some(to))
    }

    /// A generation that never served: stops its processes; the running one
    /// was never touched.
    async fn abandon(
        &mut self,
        number: u64,
        started: Vec<(ServiceName, Service)>,
        err: UpgradeError,
        progress: Progress<'_>,
    ) -> UpgradeError {
        warn!(generation = number, error = %err, "new generation failed before the cutover");
        progress(
            None,
            &format!("generation {number} failed; the running one keeps serving"),
        );
        for (_, service) in started {
            service.process.stop().await;
        }
        self.failed(number, &err);
        err
    }

    /// A failure after the cutover: every service back to the old generation in
    /// one change, new processes stopped, held services restarted from their old
    /// releases.
    async fn undo_cutover(
        &mut self,
        number: u64,
        switched: Vec<(ServiceName, Option<Service>)>,
        stopped_old: Vec<(ServiceName, Installed)>,
        err: UpgradeError,
        progress: Progress<'_>,
    ) -> UpgradeError {
        warn!(generation = number, error = %err, "new generation failed after the cutover; switching back");
        progress(
            None,
            &format!("generation {number} failed; switching every service back"),
        );
        self.roll_back(switched, stopped_old).await;
        self.failed(number, &err);
        err
    }
}

/// Copies the contents of `from` (which may not exist yet: nothing to copy)
/// into a fresh `to`, reporting (bytes copied, bytes in all); returns the bytes.
fn copy_data(
    from: &Path,
    to: &Path,
    report: &tokio::sync::mpsc::UnboundedSender<(u64, u64)>,
) -> std::io::Result<u64> {
    if to.exists() {
        // Left by a failed attempt at this same generation.
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    if !from.exists() {
        return Ok(0);
    }
    let options = fs_extra::dir::CopyOptions {
        content_only: true,
        ..fs_extra::dir::CopyOptions::new()
    };
    fs_extra::dir::copy_with_progress(from, to, &options, |p| {
        let _ = report.send((p.copied_bytes, p.total_bytes));
        fs_extra::dir::TransitProcessResult::ContinueOrAbort
    })
    .map_err(|e| std::io::Error::other(e.to_string()))
}
