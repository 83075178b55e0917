//! The server: accepts clients on every listener, serves one at a time, and shuts down.
//!
//! Each accepted client gets the serial device opened for it and a [`Session`]. A client
//! arriving while another is served is refused or replaces it, as configured. Shutdown is
//! designed in: the accept loops stop, the active session is told to finish (its input is
//! handed to the UART, its client told why), and the control lines are released last.

use crate::config::{Config, SecondClient};
use crate::session::{Framing, Report, Session, SessionInfo, SharedControl, StopRequest};
use crate::uart::{LineSettings, SerialDevice, describe_open_error};
use socket2::{SockRef, TcpKeepalive};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long a stopping session may take before the service exits anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

struct Active {
    id: u64,
    peer: SocketAddr,
    stop: watch::Sender<Option<StopRequest>>,
    task: JoinHandle<()>,
}

/// Which protocol a listening port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// Telnet + RFC 2217 (`rfc2217://`).
    Rfc2217,
    /// The ESP-aware raw port (`socket://`).
    EspRaw,
}

impl std::fmt::Display for PortKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortKind::Rfc2217 => "RFC 2217",
            PortKind::EspRaw => "ESP raw",
        })
    }
}

/// Re-reads the configuration (SIGHUP); `None` when the new one is unusable (already logged).
pub type Reload = Box<dyn Fn() -> Option<Config> + Send>;

/// Serves clients from `listeners` until `shutdown` completes (or, with `idle_exit_secs`,
/// until no client came for that long).
pub async fn serve(
    mut config: Config,
    listeners: Vec<(TcpListener, PortKind)>,
    control: SharedControl,
    shutdown: impl Future<Output = ()>,
    reload: Option<Reload>,
) {
    let idle_text = idle_status(&listeners);
    let (accepted_tx, mut accepted) = mpsc::channel::<Accepted>(4);
    let mut acceptors = Vec::new();
    for (listener, kind) in listeners {
        let tx = accepted_tx.clone();
        acceptors.push(tokio::spawn(accept_loop(listener, kind, tx)));
    }
    drop(accepted_tx);
    tokio::pin!(shutdown);
    let mut active: Option<Active> = None;
    crate::systemd::ready(&idle_text);
    // WATCHDOG=1 comes from this loop, so a wedged loop (or a session hogging the runtime's
    // one thread) stops the pings and systemd restarts the service.
    let mut watchdog = crate::systemd::watchdog_period().map(tokio::time::interval);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut idle_since = tokio::time::Instant::now();
    loop {
        let idle_deadline = (config.network.idle_exit_secs > 0 && active.is_none())
            .then(|| idle_since + Duration::from_secs(config.network.idle_exit_secs));
        tokio::select! {
            () = &mut shutdown => break,
            () = tick(&mut watchdog) => crate::systemd::watchdog_ping(),
            () = sleep_until_opt(idle_deadline) => {
                tracing::info!(
                    "no client for {} s (idle_exit_secs): exiting; the socket unit starts esp-bridge again on the next connection",
                    config.network.idle_exit_secs
                );
                break;
            }
            () = hup(&mut hangup) => {
                if let Some(new) = reload.as_ref().and_then(|r| r()) {
                    warn_unreloadable(&config, &new);
                    config = new;
                    tracing::info!("configuration re-read (SIGHUP); it applies from the next client");
                }
            }
            next = accepted.recv() => {
                let Some((stream, peer, kind)) = next else { break };
                if active.as_ref().is_some_and(|a| a.task.is_finished()) {
                    active = None;
                }
                if let Some(current) = &active {
                    match config.network.second_client {
                        SecondClient::Refuse => {
                            tokio::spawn(refuse(stream, peer, current.peer));
                            continue;
                        }
                        SecondClient::Replace => {
                            tracing::info!(
                                session = current.id,
                                "client {peer} replaces client {}", current.peer
                            );
                            if let Some(old) = active.take() {
                                stop_session(old, StopRequest::Replaced).await;
                            }
                        }
                    }
                }
                active = Some(start_session(&config, stream, peer, kind, control.clone()));
            }
            () = wait_finished(&mut active) => {
                active = None;
                idle_since = tokio::time::Instant::now();
                crate::systemd::status(&idle_text);
            }
        }
    }
    crate::systemd::stopping();
    for a in acceptors {
        a.abort();
    }
    if let Some(old) = active.take() {
        stop_session(old, StopRequest::Shutdown).await;
    }
}

fn idle_status(listeners: &[(TcpListener, PortKind)]) -> String {
    let addrs: Vec<String> = listeners
        .iter()
        .filter_map(|(l, kind)| l.local_addr().ok().map(|a| format!("{a} ({kind})")))
        .collect();
    format!("idle: waiting for a client on {}", addrs.join(", "))
}

/// Settings that only a restart can change: said once, so nobody waits for them in vain.
fn warn_unreloadable(old: &Config, new: &Config) {
    if old.network.listen != new.network.listen {
        tracing::warn!(
            "[network] listen changed: restart esp-bridge (or edit esp-bridge.socket) for it to apply"
        );
    }
    if old.control != new.control {
        tracing::warn!("[control] changed: restart esp-bridge for the new lines to be requested");
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn hup(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn wait_finished(active: &mut Option<Active>) {
    match active {
        Some(a) => {
            let _ = (&mut a.task).await;
        }
        None => std::future::pending().await,
    }
}

async fn stop_session(active: Active, why: StopRequest) {
    let _ = active.stop.send(Some(why));
    let mut task = active.task;
    if tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err() {
        tracing::warn!(
            session = active.id,
            "session did not stop in time; abandoning it"
        );
        task.abort();
    }
}

type Accepted = (TcpStream, SocketAddr, PortKind);

async fn accept_loop(listener: TcpListener, kind: PortKind, tx: mpsc::Sender<Accepted>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if tx.send((stream, peer, kind)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: transient.
                tracing::warn!("accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// TCP_NODELAY (each keystroke and each esptool frame leaves at once) and keepalive with a
/// user timeout, so a peer that vanished without a FIN frees the port.
fn tune_socket(stream: &TcpStream, keepalive: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    let interval = (keepalive / 3).max(Duration::from_secs(1));
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(interval)
            .with_retries(3),
    )?;
    // Without this, a peer that vanished while we had unacknowledged data is retried for
    // about 15 minutes instead of the keepalive budget.
    sock.set_tcp_user_timeout(Some(keepalive + interval * 3))?;
    Ok(())
}

async fn refuse(mut stream: TcpStream, peer: SocketAddr, busy_with: SocketAddr) {
    tracing::warn!(
        "refused client {peer}: the port is busy with client {busy_with} (set [network] second_client = \"replace\" to let new clients take over)"
    );
    let text = format!(
        "esp-bridge: this serial port is in use by another client ({busy_with}); try again when it disconnects.\r\n"
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(text.as_bytes())).await;
    let _ = stream.shutdown().await;
}

fn start_session(
    config: &Config,
    stream: TcpStream,
    peer: SocketAddr,
    kind: PortKind,
    control: SharedControl,
) -> Active {
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let (stop, stop_rx) = watch::channel(None);
    let config = config.clone();
    let task = tokio::spawn(async move {
        run_session(id, config, stream, peer, kind, control, stop_rx).await;
    });
    Active {
        id,
        peer,
        stop,
        task,
    }
}

async fn run_session(
    id: u64,
    config: Config,
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: PortKind,
    control: SharedControl,
    stop: watch::Receiver<Option<StopRequest>>,
) {
    if let Err(e) = tune_socket(&stream, config.network.keepalive()) {
        tracing::warn!(session = id, "could not set TCP options for {peer}: {e}");
    }
    let settings = LineSettings::from_config(&config.serial);
    let device = &config.serial.device;
    let uart = match SerialDevice::open(device, &settings) {
        Ok(u) => u,
        Err(e) => {
            let why = describe_open_error(device, &e);
            tracing::error!(session = id, peer = %peer, "client {peer} not served: {why}");
            crate::systemd::status(&format!("device missing or unusable: {}", device.display()));
            let text = format!("esp-bridge: {why}\r\n");
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(text.as_bytes()))
                .await;
            return;
        }
    };
    tracing::info!(
        session = id,
        peer = %peer,
        baud = settings.baud,
        "client {peer} connected to the {kind} port; serving {}", device.display()
    );
    crate::systemd::status(&format!("serving {} at {} baud", peer.ip(), settings.baud));
    let info = SessionInfo {
        id,
        peer,
        signature: format!("esp-bridge {}", env!("CARGO_PKG_VERSION")),
        device: device.display().to_string(),
    };
    let framing = match kind {
        PortKind::Rfc2217 => Framing::rfc2217(),
        PortKind::EspRaw => Framing::esp_raw(),
    };
    let report = Session::new(info, stream, uart, control, settings, framing)
        .run(stop)
        .await;
    log_report(id, peer, &report);
}

fn log_report(id: u64, peer: SocketAddr, r: &Report) {
    let secs = r.duration.as_secs_f64();
    let summary = format!(
        "session with {peer} ended ({}) after {secs:.1} s: {} bytes to the device, {} bytes to the client, last baud {}",
        r.reason, r.to_device, r.to_client, r.final_baud
    );
    let ignored = if r.ignored_input > 0 {
        format!("; {} malformed requests ignored", r.ignored_input)
    } else {
        String::new()
    };
    match r.reason {
        crate::session::EndReason::DeviceGone(_) | crate::session::EndReason::ClientError(_) => {
            tracing::warn!(session = id, peer = %peer, bytes_to_device = r.to_device, bytes_to_client = r.to_client, duration_s = secs, "{summary}{ignored}")
        }
        _ => {
            tracing::info!(session = id, peer = %peer, bytes_to_device = r.to_device, bytes_to_client = r.to_client, duration_s = secs, "{summary}{ignored}")
        }
    }
}
