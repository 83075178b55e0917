//! One board's bridge: its listeners, its accept policy (one client at a time; a newcomer is
//! refused or replaces the current client, as configured), the active session, the board's
//! status, and its part of the shutdown.
//!
//! Each accepted client gets the serial device opened for it and a [`Session`]. When a session
//! ends, however it ends, the control lines are released here, once. On shutdown the accept
//! loops stop, the active session is told to finish (its input is handed to the UART, its
//! client told why), and the lines reach their safe state before [`Bridge::run`] returns.

use crate::config::{BoardConfig, Config, ControlBackend, Network, SecondClient};
use crate::log_limit::limited;
use crate::session::{
    ComPort, Framing, Phase, Report, Session, SessionInfo, SharedControl, StopRequest,
};
use crate::shutdown::stopping;
use crate::status::{Activity, BoardStatus, StatusBook, StatusHandle};
use crate::timer;
use crate::uart::{SerialDevice, describe_open_error};
use socket2::{SockRef, TcpKeepalive};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

/// How long a stopping session may take before the service exits anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

struct Active {
    id: u64,
    peer: SocketAddr,
    stop: watch::Sender<Option<StopRequest>>,
    phase: watch::Receiver<Phase>,
    task: JoinHandle<()>,
}

/// How long a newcomer waits for a served client that may be on its way out (its close is
/// in flight) before the refuse/replace policy applies: `idf.py flash monitor` and CI scripts
/// connect again right after esptool closes.
const NEWCOMER_GRACE: Duration = Duration::from_millis(500);

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

/// The span every log line of a board is in: the journal gets its `BOARD=` field from it
/// (`journalctl -u esp-bridge BOARD=lab1`).
pub fn board_span(name: &str) -> tracing::Span {
    tracing::info_span!("board", board = %name)
}

/// A listening socket and the protocol it speaks.
pub type Listener = (TcpListener, PortKind);

/// One board, ready to serve.
pub struct Bridge {
    name: String,
    listeners: Vec<Listener>,
    control: SharedControl,
    status: StatusHandle,
}

/// Refusals (a newcomer told the board is busy) under way at once, each bounded in time.
const MAX_REFUSALS: usize = 8;

/// How long the control lines may take to reach their safe state at shutdown.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3);

impl Bridge {
    /// Adds the board to `book` (idle, listening on `listeners`).
    pub fn new(
        name: &str,
        device: String,
        listeners: Vec<Listener>,
        control: SharedControl,
        book: &StatusBook,
    ) -> Self {
        let resets = control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .resets();
        let status = book.add(BoardStatus::new(
            name,
            listening(&listeners),
            device,
            resets,
        ));
        Bridge {
            name: name.to_string(),
            listeners,
            control,
            status,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves clients until `shutdown` says so; each client gets the configuration `config`
    /// holds when it arrives.
    pub async fn run(
        self,
        mut config: watch::Receiver<Config>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Bridge {
            name,
            listeners,
            control,
            status,
        } = self;
        let mut served = Served::of(&name, &config.borrow_and_update());
        let (accepted_tx, mut accepted) = mpsc::channel::<Accepted>(4);
        let mut acceptors = Vec::new();
        for (listener, kind) in listeners {
            let tx = accepted_tx.clone();
            acceptors.push(tokio::spawn(
                accept_loop(listener, kind, tx).in_current_span(),
            ));
        }
        drop(accepted_tx);
        let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
        let mut active: Option<Active> = None;
        // A newcomer that arrived while a client was served, waiting a moment to see whether
        // that client is on its way out (it just closed; it half-closed).
        let mut waiting: Option<(Accepted, Instant)> = None;
        loop {
            let leaving = active
                .as_ref()
                .is_some_and(|a| *a.phase.borrow() != Phase::Serving);
            if leaving && let Some((newcomer, _)) = waiting.take() {
                // The client on its way out yields the board; the newcomer is served as soon
                // as it is gone (bounded by STOP_TIMEOUT).
                end_session(&mut active, &control, StopRequest::Yielded).await;
                let config = served.latest(&mut config);
                active = Some(start_session(
                    config,
                    newcomer,
                    control.clone(),
                    status.clone(),
                ));
                continue;
            }
            tokio::select! {
                () = stopping(&mut shutdown) => break,
                next = accepted.recv() => {
                    let Some(newcomer) = next else { break };
                    if active.as_ref().is_some_and(|a| a.task.is_finished()) {
                        end_session(&mut active, &control, StopRequest::Shutdown).await;
                    }
                    let config = served.latest(&mut config);
                    match (&active, &waiting) {
                        (None, _) => {
                            active = Some(start_session(config, newcomer, control.clone(), status.clone()));
                        }
                        (Some(_), None) => waiting = Some((newcomer, Instant::now() + NEWCOMER_GRACE)),
                        (Some(_), Some(_)) => {
                            // One newcomer waits at a time; the next is decided at once.
                            if let Some(started) = decide(&config, newcomer, &mut active, &control, &refusals).await {
                                active = Some(start_session(config, started, control.clone(), status.clone()));
                            }
                        }
                    }
                }
                () = timer::sleep_until(waiting.as_ref().map(|(_, at)| *at)) => {
                    if let Some((newcomer, _)) = waiting.take() {
                        let config = served.latest(&mut config);
                        if let Some(started) = decide(&config, newcomer, &mut active, &control, &refusals).await {
                            active = Some(start_session(config, started, control.clone(), status.clone()));
                        }
                    }
                }
                watched = watch_session(&mut active) => {
                    if let Watched::Finished = watched {
                        // Its task has ended (and must not be awaited again): only the lines.
                        active = None;
                        release(&control);
                        if let Some((newcomer, _)) = waiting.take() {
                            let config = served.latest(&mut config);
                            active = Some(start_session(config, newcomer, control.clone(), status.clone()));
                        }
                    }
                }
            }
        }
        for a in acceptors {
            a.abort();
        }
        drop(waiting);
        end_session(&mut active, &control, StopRequest::Shutdown).await;
        // The lines reach their safe state before the process (and its line request) ends.
        let settled = lock(&control).settled();
        if tokio::time::timeout(SETTLE_TIMEOUT, settled).await.is_err() {
            tracing::warn!("the control lines did not reach their safe state in time");
        }
    }
}

/// What a session of this board is served with: the shared settings and the board's own, as
/// the configuration says when the client arrives.
#[derive(Clone)]
struct Served {
    network: Network,
    board: BoardConfig,
}

impl Served {
    fn of(name: &str, config: &Config) -> Served {
        let board = config.board(name).cloned().unwrap_or_else(|| BoardConfig {
            name: name.to_string(),
            ..Config::default().boards.remove(0)
        });
        Served {
            network: config.network.clone(),
            board,
        }
    }

    /// The latest configuration for this board: a reload applies from the next client. A
    /// board the new file no longer has keeps what it had (its sockets go at the next
    /// `esp-bridge apply`). The control lines are the ones opened at start, so their settings
    /// stay, and so does the device of a board whose lines are that device's own DTR/RTS
    /// (data on a new device with resets on the old one would be worse than either): those
    /// change at a restart, as the reload's warning says.
    fn latest(&mut self, config: &mut watch::Receiver<Config>) -> Served {
        let config = config.borrow_and_update();
        self.network = config.network.clone();
        if let Some(board) = config.board(&self.board.name) {
            let mut board = board.clone();
            board.control = self.board.control.clone();
            if board.control.backend == ControlBackend::Modem {
                board.serial.device = self.board.serial.device.clone();
            }
            self.board = board;
        }
        self.clone()
    }
}

/// A newcomer while a client is served, after its grace: refused, or (with
/// `second_client = "replace"`) the current client is stopped and the newcomer returned to
/// be served.
async fn decide(
    config: &Served,
    newcomer: Accepted,
    active: &mut Option<Active>,
    control: &SharedControl,
    refusals: &Arc<Semaphore>,
) -> Option<Accepted> {
    let Some(current) = active.as_ref() else {
        return Some(newcomer);
    };
    match config.network.second_client {
        SecondClient::Refuse => {
            let (stream, peer, _) = newcomer;
            // Bounded: past that many refusals under way, a newcomer is closed without the
            // explanation (a flood, not a person).
            let busy = current.peer;
            match Arc::clone(refusals).try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(
                        async move {
                            refuse(stream, peer, busy).await;
                            drop(permit);
                        }
                        .in_current_span(),
                    );
                }
                Err(_) => refuse_silently(peer, busy),
            }
            None
        }
        SecondClient::Replace => {
            limited!(
                info,
                "takeovers",
                session = current.id,
                "client {} replaces client {}",
                newcomer.1,
                current.peer
            );
            end_session(active, control, StopRequest::Replaced).await;
            Some(newcomer)
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

/// What the active session did.
enum Watched {
    /// It half-closed or began finishing.
    PhaseChanged,
    /// Its task has ended.
    Finished,
}

/// Completes when the active session changes phase or ends; never without one.
async fn watch_session(active: &mut Option<Active>) -> Watched {
    let Some(a) = active else {
        return std::future::pending().await;
    };
    tokio::select! {
        // Once the session is gone its phase cannot change: only its end is left to see.
        Ok(()) = a.phase.changed() => Watched::PhaseChanged,
        _ = &mut a.task => Watched::Finished,
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
                limited!(warn, "failed accepts", "accepting a connection failed: {e}");
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
    limited!(
        warn,
        "refused connections",
        "refused client {peer}: the port is busy with client {busy_with} (set [network] second_client = \"replace\" to let new clients take over)"
    );
    let text = format!(
        "esp-bridge: this serial port is in use by another client ({busy_with}); try again when it disconnects.\r\n"
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

fn refuse_silently(peer: SocketAddr, busy_with: SocketAddr) {
    limited!(
        warn,
        "refused connections",
        "refused client {peer} without a word: the port is busy with client {busy_with} and {MAX_REFUSALS} refusals are under way"
    );
}

fn start_session(
    config: Served,
    accepted: Accepted,
    control: SharedControl,
    status: StatusHandle,
) -> Active {
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let peer = accepted.1;
    let (stop, stop_rx) = watch::channel(None);
    let (phase_tx, phase) = watch::channel(Phase::Serving);
    let task = tokio::spawn(
        async move {
            run_session(id, config, accepted, control, stop_rx, phase_tx, &status).await;
            status.set(Activity::Idle);
        }
        .in_current_span(),
    );
    Active {
        id,
        peer,
        stop,
        phase,
        task,
    }
}

async fn run_session(
    id: u64,
    config: Served,
    (mut stream, peer, kind): Accepted,
    control: SharedControl,
    stop: watch::Receiver<Option<StopRequest>>,
    phase: watch::Sender<Phase>,
    status: &StatusHandle,
) {
    if let Err(e) = tune_socket(&stream, config.network.keepalive) {
        limited!(
            warn,
            "failed socket options",
            session = id,
            "could not set TCP options for {peer}: {e}"
        );
    }
    let settings = config.board.serial.line_settings();
    let device = &config.board.serial.device;
    let uart = match SerialDevice::open(device, &settings) {
        Ok(u) => u,
        Err(e) => {
            let why = describe_open_error(device, &e);
            limited!(
                error,
                "clients not served",
                session = id,
                peer = %peer,
                "client {peer} not served: {why}"
            );
            status.set(Activity::DeviceUnusable {
                device: device.display().to_string(),
            });
            let text = format!("esp-bridge: {why}\r\n");
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(text.as_bytes()))
                .await;
            return;
        }
    };
    limited!(
        info,
        "session starts",
        session = id,
        peer = %peer,
        baud = settings.baud,
        "client {peer} connected to the {kind} port; serving {}", device.display()
    );
    status.set(Activity::Serving {
        peer,
        port: match kind {
            PortKind::Rfc2217 => "RFC 2217",
            PortKind::EspRaw => "ESP raw",
        },
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
        PortKind::EspRaw => Framing::esp_raw(
            settings.baud,
            config.board.serial.flash_baud.rate(),
            port.can_reset(),
        ),
    };
    let report = Session::new(info, stream, port, framing, phase)
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
    let mut ignored = if r.ignored_input > 0 {
        format!("; {} malformed requests ignored", r.ignored_input)
    } else {
        String::new()
    };
    if r.discarded > 0 {
        ignored.push_str(&format!(
            "; output to the device discarded {} time(s): flow control held it",
            r.discarded
        ));
    }
    match r.reason {
        crate::session::EndReason::DeviceGone(_) | crate::session::EndReason::ClientError(_) => {
            limited!(warn, "session ends", session = id, peer = %peer, bytes_to_device = r.to_device, bytes_to_client = r.to_client, duration_s = secs, "{summary}{ignored}")
        }
        _ => {
            limited!(info, "session ends", session = id, peer = %peer, bytes_to_device = r.to_device, bytes_to_client = r.to_client, duration_s = secs, "{summary}{ignored}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn config(backend: &str, device: &str, baud: u32) -> Config {
        Config::parse(
            &format!(
                "[serial]\ndevice = \"{device}\"\nbaud = {baud}\n[control]\nbackend = \"{backend}\"\n"
            ),
            Path::new("test.toml"),
        )
        .expect("valid")
    }

    #[test]
    fn a_reload_moves_a_gpio_board_to_its_new_device_but_not_a_modem_board() {
        for (backend, kept) in [("gpio", false), ("modem", true)] {
            let (tx, mut rx) = watch::channel(config(backend, "/dev/ttyUSB0", 115_200));
            let mut served = Served::of("default", &rx.borrow_and_update());
            tx.send_replace(config(backend, "/dev/ttyUSB1", 230_400));
            let next = served.latest(&mut rx);
            let want = if kept { "/dev/ttyUSB0" } else { "/dev/ttyUSB1" };
            assert_eq!(next.board.serial.device, PathBuf::from(want), "{backend}");
            assert_eq!(
                next.board.serial.baud.0, 230_400,
                "{backend}: the rate applies"
            );
        }
        // Control settings stay those the lines were opened with.
        let (tx, mut rx) = watch::channel(config("gpio", "/dev/ttyUSB0", 115_200));
        let mut served = Served::of("default", &rx.borrow_and_update());
        tx.send_replace(config("none", "/dev/ttyUSB0", 115_200));
        assert_eq!(
            served.latest(&mut rx).board.control.backend,
            ControlBackend::Gpio
        );
    }
}
