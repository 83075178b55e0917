//! The process-wide stop signal: the supervisor owns the sender and says when to stop (a
//! signal, idle exit, a fatal error); every task that must finish its work first (a board's
//! bridge, the control socket) waits on its receiver with [`stopping`].

use tokio::sync::watch;

/// Completes when the supervisor says to stop (or is gone).
pub async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}
