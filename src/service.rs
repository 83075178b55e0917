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

/// The async runtime.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: the bridge moves one client's bytes at a time, and a Pi Zero has one core.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::failure(format!("cannot start the async runtime: {e}")))
}

/// Serves clients with `config` until SIGTERM/SIGINT; `reload` re-reads it on SIGHUP.
pub fn run(config: Config, reload: Reload) -> Result {
    runtime()?.block_on(async {
        let signals = install_signals()?;
        let control = crate::control::from_config(&config.control, &config.serial.device)
            .map_err(Error::config)?;
        serve_with(config, control, signals, Some(reload)).await
    })
}

/// The signal handlers, first of all: a signal that arrives before them would end the process
/// with its default action.
pub fn install_signals() -> Result<Signals> {
    Signals::install().map_err(|e| Error::failure(format!("cannot install signal handlers: {e}")))
}

async fn listeners(config: &Config) -> Result<Vec<Listener>> {
    let raw_ports: Vec<u16> = config.network.raw_listen.iter().map(|a| a.port()).collect();
    let inherited = crate::systemd::inherited_listeners(&raw_ports).map_err(Error::config)?;
    let mut out = Vec::new();
    if let Some(sockets) = inherited {
        for s in sockets {
            let l = tokio::net::TcpListener::from_std(s.listener)
                .map_err(|e| Error::failure(format!("cannot use the socket from systemd: {e}")))?;
            if let Ok(a) = l.local_addr() {
                tracing::info!(
                    "listening on {a} for {} clients (socket \"{}\" passed by systemd; [network] listen is not used)",
                    s.kind,
                    s.name
                );
            }
            out.push((l, s.kind));
        }
        return Ok(out);
    }
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
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Error::failure(format!(
                "cannot listen on {addr}: {e}\n  hint: another program (another esp-bridge, ser2net?) may use the port; change [network] listen / raw_listen, or --listen / --raw-listen"
            ))
        })?;
        if let Ok(a) = l.local_addr() {
            tracing::info!("listening on {a} for {kind} clients");
        }
        out.push((l, kind));
    }
    Ok(out)
}

/// Takes the sockets systemd passed in, or binds the configured addresses, and serves until
/// SIGTERM/SIGINT.
pub async fn serve_with(
    config: Config,
    control: Box<dyn Control>,
    signals: Signals,
    reload: Option<Reload>,
) -> Result {
    let listeners = listeners(&config).await?;
    tracing::info!("serial device {}", config.serial.device.display());
    if let Ok(target) = std::fs::canonicalize(&config.serial.device)
        && let Some(hint) = crate::uart::debug_uart_hint(&config.serial.device, &target)
    {
        tracing::warn!("{hint}");
    }
    tracing::info!("control lines: {}", control.describe());
    supervise(
        config,
        listeners,
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
    supervise(config, listeners, control, Signals::none(), None, stop).await;
}

async fn supervise(
    config: Config,
    listeners: Vec<Listener>,
    control: Box<dyn Control>,
    signals: Signals,
    reload: Option<Reload>,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut supervisor = Supervisor::new(config, reload);
    let bridge = Bridge::new(
        listeners,
        Arc::new(Mutex::new(control)),
        supervisor.status_book(),
    );
    supervisor.spawn(bridge);
    supervisor.run(signals, stop).await;
}
