//! One board's bridge: its listeners, its accept policy (one client at a time; a newcomer is
//! refused or replaces the current client, as configured), the active session, the board's
//! status, and its part of the shutdown.
//!
//! Each accepted client gets the serial device opened for it and a [`Session`]. When a session
//! ends, however it ends, the control lines are released here, once. On shutdown the accept
//! loops stop, the active session is told to finish (its input is handed to the UART, its
//! client told why), and the lines reach their safe state before [`Bridge::run`] returns.

use crate::config::{Config, SecondClient};
use crate::session::{ComPort, Framing, Report, Session, SessionInfo, SharedControl, StopRequest};
use crate::status::{Activity, BoardStatus, StatusBook, StatusHandle};
use crate::uart::{SerialDevice, describe_open_error};
use socket2::{SockRef, TcpKeepalive};
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

/// A listening socket and the protocol it speaks.
pub type Listener = (TcpListener, PortKind);

/// One board, ready to serve.
pub struct Bridge {
    listeners: Vec<Listener>,
    control: SharedControl,
    status: StatusHandle,
}

/// How long the control lines may take to reach their safe state at shutdown.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3);

impl Bridge {
    /// Adds the board to `book` (idle, listening on `listeners`).
    pub fn new(listeners: Vec<Listener>, control: SharedControl, book: &StatusBook) -> Self {
        let status = book.add(BoardStatus {
            listening: listening(&listeners),
            activity: Activity::Idle,
        });
        Bridge {
            listeners,
            control,
            status,
        }
    }

    /// Serves clients until `shutdown` says so; each client gets the configuration `config`
    /// holds when it arrives.
    pub async fn run(
        self,
        mut config: watch::Receiver<Config>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Bridge {
            listeners,
            control,
            status,
        } = self;
        let (accepted_tx, mut accepted) = mpsc::channel::<Accepted>(4);
        let mut acceptors = Vec::new();
        for (listener, kind) in listeners {
            let tx = accepted_tx.clone();
            acceptors.push(tokio::spawn(accept_loop(listener, kind, tx)));
        }
        drop(accepted_tx);
        let mut active: Option<Active> = None;
        loop {
            tokio::select! {
                () = stopping(&mut shutdown) => break,
                next = accepted.recv() => {
                    let Some((stream, peer, kind)) = next else { break };
                    let config = config.borrow_and_update().clone();
                    if active.as_ref().is_some_and(|a| a.task.is_finished()) {
                        end_session(&mut active, &control, StopRequest::Shutdown).await;
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
                                end_session(&mut active, &control, StopRequest::Replaced).await;
                            }
                        }
                    }
                    active = Some(start_session(
                        config,
                        (stream, peer, kind),
                        control.clone(),
                        status.clone(),
                    ));
                }
                () = wait_finished(&mut active) => {
                    // Its task has ended (and must not be awaited again): only the lines.
                    active = None;
                    release(&control);
                }
            }
        }
        for a in acceptors {
            a.abort();
        }
        end_session(&mut active, &control, StopRequest::Shutdown).await;
        // The lines reach their safe state before the process (and its line request) ends.
        let settled = lock(&control).settled();
        if tokio::time::timeout(SETTLE_TIMEOUT, settled).await.is_err() {
            tracing::warn!("the control lines did not reach their safe state in time");
        }
    }
}

/// Completes when the supervisor says to stop (or is gone).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

fn lock(control: &SharedControl) -> std::sync::MutexGuard<'_, Box<dyn crate::control::Control>> {
    control
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ends the active session, if there is one: asks it to stop for `why` (bounded), then
/// releases the control lines, whatever state the client left them in.
async fn end_session(active: &mut Option<Active>, control: &SharedControl, why: StopRequest) {
    let Some(a) = active.take() else { return };
    stop_session(a, why).await;
    release(control);
}

fn release(control: &SharedControl) {
    if let Err(e) = lock(control).release() {
        tracing::error!("could not release the control lines: {e}");
    }
}

fn listening(listeners: &[Listener]) -> Vec<String> {
    listeners
        .iter()
        .filter_map(|(l, kind)| l.local_addr().ok().map(|a| format!("{a} ({kind})")))
        .collect()
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
    config: Config,
    accepted: Accepted,
    control: SharedControl,
    status: StatusHandle,
) -> Active {
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let peer = accepted.1;
    let (stop, stop_rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        run_session(id, config, accepted, control, stop_rx, &status).await;
        status.set(Activity::Idle);
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
    (mut stream, peer, kind): Accepted,
    control: SharedControl,
    stop: watch::Receiver<Option<StopRequest>>,
    status: &StatusHandle,
) {
    if let Err(e) = tune_socket(&stream, config.network.keepalive()) {
        tracing::warn!(session = id, "could not set TCP options for {peer}: {e}");
    }
    let settings = config.serial.line_settings();
    let device = &config.serial.device;
    let uart = match SerialDevice::open(device, &settings) {
        Ok(u) => u,
        Err(e) => {
            let why = describe_open_error(device, &e);
            tracing::error!(session = id, peer = %peer, "client {peer} not served: {why}");
            status.set(Activity::DeviceUnusable {
                device: device.display().to_string(),
            });
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
    status.set(Activity::Serving {
        peer,
        baud: settings.baud,
    });
    let info = SessionInfo {
        id,
        peer,
        device: device.display().to_string(),
    };
    let port = ComPort::new(
        uart,
        settings,
        control,
        id,
        format!("esp-bridge {}", env!("CARGO_PKG_VERSION")),
        status.clone(),
    );
    let framing = match kind {
        PortKind::Rfc2217 => Framing::rfc2217(),
        PortKind::EspRaw => Framing::esp_raw(),
    };
    let report = Session::new(info, stream, port, framing).run(stop).await;
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
