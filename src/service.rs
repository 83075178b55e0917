//! The service assembled from its configuration: the runtime, the signal handlers, the
//! listening sockets (passed in by systemd or bound here), the control lines, and the bridge
//! under its supervisor, which runs until SIGTERM.
//!
//! `cli` only parses the command line and calls [`run`]; the demo calls [`serve_with`] with a
//! virtual chip's lines in place of the configured ones.

use crate::bridge::{Bridge, Listener};
use crate::config::Config;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::supervisor::{Reload, Signals, Supervisor};
use std::collections::BTreeMap;
use std::path::Path;
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
pub fn run(config: Config, reload: Reload, control_path: Option<&Path>) -> Result {
    block_on(async {
        let signals = install_signals()?;
        // What check-config would call an error stops the service before it serves: the same
        // checks, so the two never disagree.
        if let Some(e) = crate::check::errors(&crate::check::findings(&config)) {
            return Err(Error::config(e));
        }
        let mut controls = BTreeMap::new();
        for board in &config.boards {
            let control = crate::bridge::board_span(&board.name)
                .in_scope(|| crate::control::from_config(&board.control, &board.serial.device))
                .map_err(|e| Error::config(in_board(&config, &board.name, e)))?;
            controls.insert(board.name.clone(), control);
        }
        let sockets = sockets(&config, control_path).await?;
        serve_with(config, sockets, controls, signals, Some(reload)).await
    })
}

/// A message about one board, prefixed with its name where there are several.
fn in_board(config: &Config, board: &str, message: String) -> String {
    if config.boards.len() > 1 {
        format!("board {board}: {message}")
    } else {
        message
    }
}

/// The signal handlers, first of all: a signal that arrives before them would end the process
/// with its default action.
pub fn install_signals() -> Result<Signals> {
    Signals::install().map_err(|e| Error::failure(format!("cannot install signal handlers: {e}")))
}

/// Where clients and the control socket connect: what systemd passed in, or the configured
/// addresses bound here.
pub struct Sockets {
    /// Each board's listeners, by board name.
    pub boards: BTreeMap<String, Vec<Listener>>,
    /// Listeners systemd passed in for boards the configuration does not have (stale units):
    /// their clients are told so.
    pub strays: Vec<(String, Listener)>,
    pub control: Option<tokio::net::UnixListener>,
}

/// The sockets systemd passed in, or the configured addresses bound here (and the control
/// socket at `control_path`, if given).
pub async fn sockets(config: &Config, control_path: Option<&Path>) -> Result<Sockets> {
    let Some(passed) = crate::systemd::passed_sockets().map_err(Error::config)? else {
        let control = control_path.map(crate::admin::bind).transpose()?;
        return Ok(Sockets {
            boards: listeners(config).await?,
            strays: Vec::new(),
            control,
        });
    };
    let mut boards: BTreeMap<String, Vec<Listener>> = BTreeMap::new();
    let mut strays = Vec::new();
    for (board, kind, listener) in passed.boards {
        let l = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::failure(format!("cannot use the socket from systemd: {e}")))?;
        // A socket without a board name belongs to the only board, if there is one.
        let name = match (board, config.boards.as_slice()) {
            (Some(name), _) => name,
            (None, [only]) => only.name.clone(),
            (None, _) => {
                return Err(Error::config(
                    "systemd passed a socket without a board name, but the configuration has several boards: name each socket BOARD.rfc2217, BOARD.raw or BOARD.console (`sudo esp-bridge apply` makes such units)",
                ));
            }
        };
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        if config.board(&name).is_none() {
            tracing::error!(
                "systemd passed a socket on {addr} for board {name}, which /etc/esp-bridge.toml does not have: its clients are told so; run `sudo esp-bridge apply` after editing the file"
            );
            strays.push((name, (l, kind)));
            continue;
        }
        tracing::info!(
            "board {name}: listening on {addr} for {kind} clients (socket passed by systemd)"
        );
        boards.entry(name).or_default().push((l, kind));
    }
    for board in &config.boards {
        if !boards.contains_key(&board.name) {
            tracing::warn!(
                "board {}: systemd passed no socket for it: run `sudo esp-bridge apply` after editing /etc/esp-bridge.toml",
                board.name
            );
        }
    }
    let control = passed
        .control
        .map(tokio::net::UnixListener::from_std)
        .transpose()
        .map_err(|e| Error::failure(format!("cannot use the control socket from systemd: {e}")))?;
    Ok(Sockets {
        boards,
        strays,
        control,
    })
}

/// Every board's configured addresses, bound here.
pub async fn listeners(config: &Config) -> Result<BTreeMap<String, Vec<Listener>>> {
    let mut out = BTreeMap::new();
    for board in &config.boards {
        let mut bound = Vec::new();
        for (addr, kind) in board.ports() {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| listen_error(addr, &e))?;
            if let Ok(a) = l.local_addr() {
                tracing::info!("board {}: listening on {a} for {kind} clients", board.name);
            }
            bound.push((l, kind));
        }
        out.insert(board.name.clone(), bound);
    }
    Ok(out)
}

/// Why an address cannot be listened on, with the fix.
fn listen_error(addr: &std::net::SocketAddr, e: &std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => Error::config(format!(
            "cannot listen on {addr}: {e}\n  hint: ports below 1024 need privileges esp-bridge does not have: use a port from 1024 up in [network] listen / raw_listen / console_listen (or --listen / --raw-listen / --console-listen), or let the socket unit, which may use any port, start esp-bridge"
        )),
        std::io::ErrorKind::AddrInUse => Error::failure(format!(
            "cannot listen on {addr}: {e}\n  hint: another program (another esp-bridge, ser2net?) uses the port: `ss -ltnp 'sport = {}'` shows it; stop it or change [network] listen / raw_listen / console_listen (or --listen / --raw-listen / --console-listen)",
            addr.port()
        )),
        std::io::ErrorKind::AddrNotAvailable => Error::config(format!(
            "cannot listen on {addr}: {e}\n  hint: the address is not one of this machine's: use 0.0.0.0 (every IPv4 address), [::] or one `ip addr` shows"
        )),
        _ => Error::failure(format!("cannot listen on {addr}: {e}")),
    }
}

/// Serves every board on its sockets until SIGTERM/SIGINT, each board's DTR/RTS going to its
/// entry in `controls`.
pub async fn serve_with(
    config: Config,
    sockets: Sockets,
    controls: BTreeMap<String, Box<dyn Control>>,
    signals: Signals,
    reload: Option<Reload>,
) -> Result {
    for board in &config.boards {
        let device = &board.serial.device;
        tracing::info!("board {}: serial device {}", board.name, device.display());
        if let Ok(target) = std::fs::canonicalize(device)
            && let Some(hint) = crate::uart::debug_uart_hint(device, &target)
        {
            tracing::warn!("board {}: {hint}", board.name);
        }
        if let Some(control) = controls.get(&board.name) {
            tracing::info!(
                "board {}: control lines: {}",
                board.name,
                control.describe()
            );
        }
    }
    supervise(
        config,
        sockets,
        controls,
        signals,
        reload,
        std::future::pending(),
    )
    .await;
    Ok(())
}

/// Serves the only board of `config` on `listeners`, its DTR/RTS going to `control`, until
/// `stop` completes: the service without signal handlers, sockets from systemd or a
/// configuration file. The in-process tests start it on `127.0.0.1:0`.
pub async fn serve(
    config: Config,
    listeners: Vec<Listener>,
    control: Box<dyn Control>,
    stop: impl std::future::Future<Output = ()>,
) {
    let name = config
        .boards
        .first()
        .map(|b| b.name.clone())
        .unwrap_or_default();
    let sockets = Sockets {
        boards: BTreeMap::from([(name.clone(), listeners)]),
        strays: Vec::new(),
        control: None,
    };
    let controls = BTreeMap::from([(name, control)]);
    supervise(config, sockets, controls, Signals::none(), None, stop).await;
}

async fn supervise(
    config: Config,
    mut sockets: Sockets,
    mut controls: BTreeMap<String, Box<dyn Control>>,
    signals: Signals,
    reload: Option<Reload>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut supervisor = Supervisor::new(config.clone(), reload);
    for board in &config.boards {
        let listeners = sockets.boards.remove(&board.name).unwrap_or_default();
        let Some(control) = controls.remove(&board.name) else {
            continue;
        };
        let bridge = Bridge::new(
            &board.name,
            board.serial.device.display().to_string(),
            listeners,
            Arc::new(Mutex::new(control)),
            supervisor.status_book(),
            board.serial.history_kib.bytes(),
        );
        supervisor.spawn(bridge);
    }
    for (name, listener) in sockets.strays {
        supervisor.refuse_stray(name, listener);
    }
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
