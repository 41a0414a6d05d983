//! Data directories of a full shadow generation.
//!
//! With `shadow-full`, every started service runs on a copy of its data
//! directory (`ROOT/data/<service>/g<generation>`, copied with fs_extra on a
//! blocking thread, its progress reported), so the new generation is a complete
//! copy of the instance and its `pre_swap` hooks (migrations) never touch the
//! data the running generation serves from. A service that cannot overlap is
//! copied after its old process stopped (the plan holds it first), so its copy
//! misses no write. Copies no generation needs are pruned
//! ([`Instance::prune_data`]).

use image_spec::ServiceName;

use std::path::{Path, PathBuf};

use super::{Installed, Instance, Progress, UpgradeError, read_manifest};

impl Instance {
    /// With `full`, copies the service's data directory (if it declares data)
    /// for generation `number` and returns the copy; otherwise `None` (the
    /// service keeps its data directory).
    pub(super) async fn data_copy(
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
