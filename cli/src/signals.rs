//! Graceful shutdown of the daemons on SIGINT and SIGTERM.

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Registers for SIGINT and SIGTERM now (before the daemon says it is ready, so a
/// signal sent right away is not lost to the default action) and returns a token
/// cancelled when either arrives, with the task that waits for them.
pub(crate) fn shutdown_on_signals() -> Result<(CancellationToken, tokio::task::JoinHandle<()>)> {
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    let waiter = tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        cancel.cancel();
    });
    Ok((token, waiter))
}
