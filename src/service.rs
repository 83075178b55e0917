//! The service assembled from its configuration: the runtime, the signal handlers, the
//! listening sockets (passed in by systemd or bound here), the control lines, and the bridge
//! under its supervisor, which runs until SIGTERM.
//!
//! `cli` only parses the command line and calls [`run`]; the demo calls [`serve_with`] with a
//! virtual chip's lines in place of the configured ones.

use crate::bridge::{Bridge, Listener, PortKind};
use crate::config::Config;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::supervisor::{Reload, Signals, Supervisor};
use std::sync::{Arc, Mutex};

/// Runs `service` on the async runtime until it returns, then ends the runtime without
/// waiting for a blocking call that is still stuck (a drain on a wedged UART, a reload from a
/// hung file system): the process exits in bounded time whatever the hardware does.
pub fn block_on(service: impl std::future::Future<Output = Result>) -> Result {
    // One thread: the bridge moves little data per board, and a Pi Zero has one core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::failure(format!("cannot start the async runtime: {e}")))?;
    let result = rt.block_on(service);
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

/// Serves clients with `config` until SIGTERM/SIGINT; `reload` re-reads it on SIGHUP. Without
/// systemd, `control_path` is where the control socket (`esp-bridge status`) is bound.
pub fn run(config: Config, reload: Reload, control_path: Option<&std::path::Path>) -> Result {
    block_on(async {
        let signals = install_signals()?;
        // What check-config would call an error stops the service before it serves: the same
        // checks, so the two never disagree.
        if let Some(e) = crate::check::errors(&crate::check::findings(&config)) {
            return Err(Error::config(e));
        }
        let control = crate::control::from_config(&config.control, &config.serial.device)
            .map_err(Error::config)?;
        let sockets = sockets(&config, control_path).await?;
        serve_with(config, sockets, control, signals, Some(reload)).await
    })
}

/// The signal handlers, first of all: a signal that arrives before them would end the process
/// with its default action.
pub fn install_signals() -> Result<Signals> {
    Signals::install().map_err(|e| Error::failure(format!("cannot install signal handlers: {e}")))
}

/// Where clients and the control socket connect: what systemd passed in, or the configured
/// addresses bound here.
pub struct Sockets {
    pub boards: Vec<Listener>,
    pub control: Option<tokio::net::UnixListener>,
}

/// The sockets systemd passed in, or the configured addresses bound here (and the control
/// socket at `control_path`, if given).
pub async fn sockets(config: &Config, control_path: Option<&std::path::Path>) -> Result<Sockets> {
    if let Some(passed) = crate::systemd::passed_sockets().map_err(Error::config)? {
        let mut boards = Vec::new();
        for (board, kind, listener) in passed.boards {
            if let Some(name) = board.as_deref()
                && name != crate::units::DEFAULT_BOARD
            {
                return Err(Error::config(format!(
                    "systemd passed a socket for board \"{name}\", which the configuration does not have: run `sudo esp-bridge apply` after editing /etc/esp-bridge.toml"
                )));
            }
            let l = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| Error::failure(format!("cannot use the socket from systemd: {e}")))?;
            if let Ok(a) = l.local_addr() {
                tracing::info!(
                    "listening on {a} for {kind} clients (socket passed by systemd; [network] listen is not used)"
                );
            }
            boards.push((l, kind));
        }
        let control = passed
            .control
            .map(tokio::net::UnixListener::from_std)
            .transpose()
            .map_err(|e| {
                Error::failure(format!("cannot use the control socket from systemd: {e}"))
            })?;
        return Ok(Sockets { boards, control });
    }
    let control = match control_path {
        Some(path) => Some(crate::admin::bind(path)?),
        None => None,
    };
    Ok(Sockets {
        boards: listeners(config).await?,
        control,
    })
}

/// The configured addresses, bound here.
pub async fn listeners(config: &Config) -> Result<Vec<Listener>> {
    let mut out = Vec::new();
    let wanted = config
        .network
        .listen
        .iter()
        .map(|a| (a, PortKind::Rfc2217))
        .chain(
            config
                .network
                .raw_listen
                .iter()
                .map(|a| (a, PortKind::EspRaw)),
        );
    for (addr, kind) in wanted {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| listen_error(addr, &e))?;
        if let Ok(a) = l.local_addr() {
            tracing::info!("listening on {a} for {kind} clients");
        }
        out.push((l, kind));
    }
    Ok(out)
}

/// Why an address cannot be listened on, with the fix.
fn listen_error(addr: &std::net::SocketAddr, e: &std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => Error::config(format!(
            "cannot listen on {addr}: {e}\n  hint: ports below 1024 need privileges esp-bridge does not have: use a port from 1024 up in [network] listen / raw_listen (or --listen / --raw-listen), or let the socket unit, which may use any port, start esp-bridge"
        )),
        std::io::ErrorKind::AddrInUse => Error::failure(format!(
            "cannot listen on {addr}: {e}\n  hint: another program (another esp-bridge, ser2net?) uses the port: `ss -ltnp 'sport = {}'` shows it; stop it or change [network] listen / raw_listen (or --listen / --raw-listen)",
            addr.port()
        )),
        std::io::ErrorKind::AddrNotAvailable => Error::config(format!(
            "cannot listen on {addr}: {e}\n  hint: the address is not one of this machine's: use 0.0.0.0 (every IPv4 address), [::] or one `ip addr` shows"
        )),
        _ => Error::failure(format!("cannot listen on {addr}: {e}")),
    }
}

/// Takes the sockets systemd passed in, or binds the configured addresses, and serves until
/// SIGTERM/SIGINT.
pub async fn serve_with(
    config: Config,
    sockets: Sockets,
    control: Box<dyn Control>,
    signals: Signals,
    reload: Option<Reload>,
) -> Result {
    tracing::info!("serial device {}", config.serial.device.display());
    if let Ok(target) = std::fs::canonicalize(&config.serial.device)
        && let Some(hint) = crate::uart::debug_uart_hint(&config.serial.device, &target)
    {
        tracing::warn!("{hint}");
    }
    tracing::info!("control lines: {}", control.describe());
    supervise(
        config,
        sockets,
        control,
        signals,
        reload,
        std::future::pending(),
    )
    .await;
    Ok(())
}

/// Serves one board from `config` on `listeners`, its DTR/RTS going to `control`, until
/// `stop` completes: the service without signal handlers, sockets from systemd or a
/// configuration file. The in-process tests start it on `127.0.0.1:0`.
pub async fn serve(
    config: Config,
    listeners: Vec<Listener>,
    control: Box<dyn Control>,
    stop: impl std::future::Future<Output = ()>,
) {
    let sockets = Sockets {
        boards: listeners,
        control: None,
    };
    supervise(config, sockets, control, Signals::none(), None, stop).await;
}

async fn supervise(
    config: Config,
    sockets: Sockets,
    control: Box<dyn Control>,
    signals: Signals,
    reload: Option<Reload>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut supervisor = Supervisor::new(config, reload);
    let bridge = Bridge::new(
        crate::units::DEFAULT_BOARD,
        sockets.boards,
        Arc::new(Mutex::new(control)),
        supervisor.status_book(),
    );
    supervisor.spawn(bridge);
    if let Some(listener) = sockets.control {
        supervisor.serve_control(listener);
    }
    supervisor.run(signals, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blocking call that never returns (a drain on a wedged UART) must not keep the
    /// process from exiting once the service is done.
    #[test]
    fn the_runtime_ends_without_waiting_for_a_stuck_blocking_call() {
        let started = std::time::Instant::now();
        let result = block_on(async {
            tokio::task::spawn_blocking(|| std::thread::sleep(std::time::Duration::from_secs(30)));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            Ok(())
        });
        assert!(result.is_ok());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
