//! Shutdown signals: SIGTERM (systemd stop) and SIGINT (Ctrl-C) both begin a clean shutdown.

use tokio::signal::unix::{SignalKind, signal};

/// Completes when the process is asked to stop. If the signal handlers cannot be installed
/// (which only happens when the runtime is misconfigured) it never completes, and the
/// default disposition of the signals still ends the process.
pub async fn requested() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; SIGTERM will end the process abruptly");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{name} received: finishing the current session and stopping");
}
