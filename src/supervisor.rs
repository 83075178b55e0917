//! The process supervisor: everything that concerns the process as a whole, in one place.
//! It owns the signals (installed before READY=1, so none can arrive unhandled), the systemd
//! notifications (readiness, the one-line status of every board, the watchdog, stopping),
//! configuration reloads, the idle exit, and the shutdown: it tells every bridge to stop and
//! waits for them, bounded, so the process always ends well inside `TimeoutStopSec`.

use crate::bridge::Bridge;
use crate::config::{Config, ControlBackend};
use crate::shutdown::stopping;
use crate::status::{Activity, StatusBook};
use crate::timer;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Re-reads the configuration (SIGHUP); `None` when the new one is unusable (already logged).
/// It runs on the blocking pool: file I/O never stalls the thread that moves the bytes.
pub type Reload = Arc<dyn Fn() -> Option<Config> + Send + Sync>;

/// How long a reload may take before the running configuration is kept without it.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the bridges may take to stop (their sessions hand over their last bytes, the
/// control lines settle) before the process exits anyway: well inside the unit's
/// `TimeoutStopSec=15`.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The signals the service handles, installed once at start-up.
pub struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
    hup: Option<Signal>,
}

/// What a signal asks of the process.
enum Asked {
    Stop(&'static str),
    Reload,
}

impl Signals {
    /// Installs the handlers for SIGTERM, SIGINT and SIGHUP. Must run inside the runtime.
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: Some(signal(SignalKind::terminate())?),
            int: Some(signal(SignalKind::interrupt())?),
            hup: Some(signal(SignalKind::hangup())?),
        })
    }

    /// No signals at all (the in-process tests stop the supervisor by other means).
    pub fn none() -> Signals {
        Signals {
            term: None,
            int: None,
            hup: None,
        }
    }

    async fn next(&mut self) -> Asked {
        tokio::select! {
            () = recv(&mut self.term) => Asked::Stop("SIGTERM"),
            () = recv(&mut self.int) => Asked::Stop("SIGINT"),
            () = recv(&mut self.hup) => Asked::Reload,
        }
    }
}

async fn recv(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// The bridges of this process and what they share.
pub struct Supervisor {
    book: StatusBook,
    config: watch::Sender<Config>,
    shutdown: watch::Sender<bool>,
    bridges: Vec<JoinHandle<()>>,
    reload: Option<Reload>,
}

impl Supervisor {
    pub fn new(config: Config, reload: Option<Reload>) -> Self {
        Supervisor {
            book: StatusBook::new(),
            config: watch::Sender::new(config),
            shutdown: watch::Sender::new(false),
            bridges: Vec::new(),
            reload,
        }
    }

    /// Where the bridges record their status.
    pub fn status_book(&self) -> &StatusBook {
        &self.book
    }

    /// Starts a bridge; it serves until the supervisor stops. Its log lines carry its board.
    pub fn spawn(&mut self, bridge: Bridge) {
        let config = self.config.subscribe();
        let shutdown = self.shutdown.subscribe();
        let span = crate::bridge::board_span(bridge.name());
        self.bridges
            .push(tokio::spawn(tracing::Instrument::instrument(
                bridge.run(config, shutdown),
                span,
            )));
    }

    /// Tells each client of a socket systemd passed for a board the configuration does not
    /// have why it is not served (until the supervisor stops).
    pub fn refuse_stray(&mut self, board: String, (listener, _): crate::bridge::Listener) {
        let mut shutdown = self.shutdown.subscribe();
        self.bridges.push(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stopping(&mut shutdown) => return,
                    a = listener.accept() => a,
                };
                if let Ok((mut stream, peer)) = accepted {
                    crate::log_limit::limited!(
                        warn,
                        "clients of unknown boards",
                        "client {peer} not served: board {board} is not in the configuration (run `sudo esp-bridge apply`)"
                    );
                    let text = format!(
                        "esp-bridge: board {board} is not in the configuration any more; ask the administrator to run `sudo esp-bridge apply`\r\n"
                    );
                    tokio::spawn(async move {
                        use tokio::io::AsyncWriteExt;
                        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(text.as_bytes())).await;
                    });
                }
            }
        }));
    }

    /// Answers `esp-bridge status` on the control socket until the supervisor stops.
    pub fn serve_control(&mut self, listener: tokio::net::UnixListener) {
        let book = self.book.clone();
        let shutdown = self.shutdown.subscribe();
        self.bridges
            .push(tokio::spawn(crate::admin::serve(listener, book, shutdown)));
    }

    /// Runs until a signal (or `stop`) says to stop, or the idle exit is due; then stops
    /// every bridge.
    pub async fn run(self, mut signals: Signals, stop: impl Future<Output = ()>) {
        let Supervisor {
            book,
            config,
            shutdown,
            bridges,
            reload,
        } = self;
        tokio::pin!(stop);
        let mut changes = book.subscribe();
        crate::systemd::ready(&book.line());
        // WATCHDOG=1 comes from this loop, so a wedged loop (or a session hogging the runtime's
        // one thread) stops the pings and systemd restarts the service.
        let mut watchdog = crate::systemd::watchdog_period().map(tokio::time::interval);
        let mut idle_since = Some(Instant::now());
        // A board whose output goes to the journal is read from the start, client or not: the
        // service is never idle then (a change of `journal` needs a restart, see
        // `warn_unreloadable`).
        let journaling = config
            .borrow()
            .boards
            .iter()
            .find(|b| b.serial.journal)
            .map(|b| b.name.clone());
        if let Some(board) = &journaling
            && config.borrow().network.idle_exit.is_some()
        {
            tracing::info!(
                "idle_exit_secs does not apply: board {board} sends its output to the journal, so esp-bridge keeps reading it"
            );
        }
        let mut reloading: Option<(JoinHandle<Option<Config>>, Instant)> = None;
        // Every second: the counts of rate-limited log lines whose window is over, and the
        // notifications a full socket held back.
        let mut housekeeping = Some(tokio::time::interval(Duration::from_secs(1)));
        loop {
            let idle_exit = config
                .borrow()
                .network
                .idle_exit
                .filter(|_| journaling.is_none());
            let idle_deadline = idle_since
                .zip(idle_exit)
                .and_then(|(since, after)| since.checked_add(after));
            tokio::select! {
                () = &mut stop => break,
                asked = signals.next() => match asked {
                    Asked::Stop(name) => {
                        tracing::info!("{name} received: finishing the current session and stopping");
                        break;
                    }
                    Asked::Reload => match (&reload, &reloading) {
                        (Some(r), None) => {
                            let r = Arc::clone(r);
                            reloading = Some((
                                tokio::task::spawn_blocking(move || r()),
                                Instant::now() + RELOAD_TIMEOUT,
                            ));
                        }
                        (Some(_), Some(_)) => tracing::info!("SIGHUP: a reload is already under way"),
                        (None, _) => {}
                    },
                },
                () = timer::tick(&mut watchdog) => crate::systemd::watchdog_ping(),
                () = timer::tick(&mut housekeeping) => {
                    crate::log_limit::flush();
                    crate::systemd::retry();
                }
                Ok(()) = changes.changed() => {
                    let boards = changes.borrow_and_update().clone();
                    // Idle from the last change on which no board is serving a client.
                    let serving = boards
                        .iter()
                        .any(|b| matches!(b.activity, Activity::Serving { .. } | Activity::Watched { .. }));
                    idle_since = (!serving).then(Instant::now);
                    crate::systemd::status(&crate::status::summary(&boards));
                }
                read = reload_done(&mut reloading) => {
                    reloading = None;
                    match read {
                        Some(Some(new)) => {
                            warn_unreloadable(&config.borrow(), &new);
                            config.send_replace(new);
                            tracing::info!("configuration re-read (SIGHUP); it applies from the next client");
                        }
                        Some(None) => {}
                        None => tracing::error!(
                            "SIGHUP: reading the configuration did not finish within {} s: keeping the running configuration",
                            RELOAD_TIMEOUT.as_secs()
                        ),
                    }
                }
                () = timer::sleep_until(idle_deadline) => {
                    tracing::info!(
                        "no client for {} s (idle_exit_secs): exiting; the socket unit starts esp-bridge again on the next connection",
                        idle_exit.unwrap_or_default().as_secs()
                    );
                    break;
                }
            }
        }
        crate::systemd::stopping();
        let _ = shutdown.send(true);
        let all = async {
            for b in bridges {
                let _ = b.await;
            }
        };
        if tokio::time::timeout(STOP_TIMEOUT, all).await.is_err() {
            tracing::warn!("a bridge did not stop in time; exiting anyway");
        }
    }
}

/// The result of a reload under way: `Some(config or None)` when it finished, `None` when it
/// took too long (it is abandoned; a blocked read cannot hold up the exit, see `service`).
async fn reload_done(
    reloading: &mut Option<(JoinHandle<Option<Config>>, Instant)>,
) -> Option<Option<Config>> {
    match reloading {
        Some((task, deadline)) => match tokio::time::timeout_at(*deadline, task).await {
            Ok(Ok(read)) => Some(read),
            Ok(Err(_)) => Some(None),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Settings that only a restart can change: said once, so nobody waits for them in vain.
/// A reload applies per board, from its next client: serial settings and the session's
/// network settings. Boards, ports and control lines need `esp-bridge apply`: said per board.
fn warn_unreloadable(old: &Config, new: &Config) {
    let apply = "run `sudo esp-bridge apply` (or restart esp-bridge) for it to take effect";
    for b in &new.boards {
        match old.board(&b.name) {
            None => tracing::warn!("board {} is new: {apply}", b.name),
            Some(o) => {
                if o.listen != b.listen
                    || o.raw_listen != b.raw_listen
                    || o.console_listen != b.console_listen
                {
                    tracing::warn!("board {}: its ports changed: {apply}", b.name);
                }
                if o.serial.journal != b.serial.journal {
                    tracing::warn!(
                        "board {}: whether its output goes to the journal changed: {apply}",
                        b.name
                    );
                }
                if o.control != b.control {
                    tracing::warn!("board {}: its control lines changed: {apply}", b.name);
                }
                let modem_device = o.control.backend == ControlBackend::Modem
                    && o.serial.device != b.serial.device;
                if modem_device {
                    tracing::warn!(
                        "board {}: its device changed, and its reset lines are that device's DTR/RTS: {apply}; until then it is served on {}",
                        b.name,
                        o.serial.device.display()
                    );
                } else if o.serial != b.serial {
                    tracing::info!(
                        "board {}: serial settings changed; they apply from its next client",
                        b.name
                    );
                }
            }
        }
    }
    for o in &old.boards {
        if new.board(&o.name).is_none() {
            tracing::warn!(
                "board {} is gone from the configuration; it is served as before until: {apply}",
                o.name
            );
        }
    }
}
