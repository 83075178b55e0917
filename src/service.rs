//! The service assembled from its configuration: the runtime, the listening sockets (passed
//! in by systemd or bound here), the control lines, and the server that runs until SIGTERM.
//!
//! `cli` only parses the command line and calls [`run`]; the demo calls [`serve_with`] with a
//! virtual chip's lines in place of the configured ones.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::server::{PortKind, Reload};
use crate::session::SharedControl;
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
        let control = crate::control::from_config(&config.control, &config.serial.device)
            .map_err(Error::config)?;
        serve_with(config, Arc::new(Mutex::new(control)), Some(reload)).await
    })
}

async fn listeners(config: &Config) -> Result<Vec<(tokio::net::TcpListener, PortKind)>> {
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
pub async fn serve_with(config: Config, control: SharedControl, reload: Option<Reload>) -> Result {
    let listeners = listeners(&config).await?;
    tracing::info!("serial device {}", config.serial.device.display());
    if let Ok(target) = std::fs::canonicalize(&config.serial.device)
        && let Some(hint) = crate::uart::debug_uart_hint(&config.serial.device, &target)
    {
        tracing::warn!("{hint}");
    }
    {
        let c = control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tracing::info!("control lines: {}", c.describe());
    }
    crate::server::serve(
        config,
        listeners,
        control.clone(),
        crate::shutdown::requested(),
        reload,
    )
    .await;
    // The lines go to their safe state before the process (and its line request) ends.
    let settled = {
        let mut c = control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = c.release() {
            tracing::error!("releasing the control lines failed: {e}");
        }
        c.settled()
    };
    if tokio::time::timeout(std::time::Duration::from_secs(3), settled)
        .await
        .is_err()
    {
        tracing::warn!("the control lines did not reach their safe state in time");
    }
    Ok(())
}
