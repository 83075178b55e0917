//! systemd glue, kept at the edge: sockets passed in by a `.socket` unit, readiness, status
//! and watchdog notifications, and logging to the journal.
//!
//! Everything here degrades to nothing outside systemd: without LISTEN_FDS the daemon binds
//! its own addresses, without NOTIFY_SOCKET notifications are no-ops, and without the journal
//! logs go to stderr.

use crate::protocol::PortKind;
use sd_notify::NotifyState;
use std::net::TcpListener;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What a socket passed in by systemd is for, by its name (`FileDescriptorName=` in its unit:
/// the generated board sockets say `<board>.rfc2217` or `<board>.raw`, the control socket
/// `control`). A name, never a port number or the order of the sockets, decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdName {
    /// A board's port; `board` is `None` for a name without one (a hand-made unit naming its
    /// socket `rfc2217` or `raw`, or none at all): the configuration's only board.
    Board {
        board: Option<String>,
        kind: PortKind,
    },
    /// The local control socket (`esp-bridge status`).
    Control,
}

/// Reads a `FileDescriptorName=`.
pub fn parse_fd_name(name: &str) -> Result<FdName, String> {
    let kind_of = |k: &str| match k {
        "rfc2217" => Some(PortKind::Rfc2217),
        "raw" => Some(PortKind::EspRaw),
        "console" => Some(PortKind::Console),
        _ => None,
    };
    match name {
        "control" => Ok(FdName::Control),
        // systemd names a socket after its unit when the unit gives no name.
        "" | "unknown" | "esp-bridge.socket" => Ok(FdName::Board {
            board: None,
            kind: PortKind::Rfc2217,
        }),
        _ => {
            if let Some(kind) = kind_of(name) {
                return Ok(FdName::Board { board: None, kind });
            }
            match name.rsplit_once('.') {
                Some((board, k)) if !board.is_empty() && kind_of(k).is_some() => {
                    Ok(FdName::Board {
                        board: Some(board.to_string()),
                        kind: kind_of(k).unwrap_or(PortKind::Rfc2217),
                    })
                }
                _ => Err(format!(
                    "a socket passed by systemd is named \"{name}\", which esp-bridge does not know: its socket units name their sockets BOARD.rfc2217, BOARD.raw, BOARD.console or control (FileDescriptorName=); run `sudo esp-bridge apply` to regenerate them from /etc/esp-bridge.toml"
                )),
            }
        }
    }
}

/// The sockets systemd passed in, by what they are for.
#[derive(Debug, Default)]
pub struct Passed {
    /// Board ports: (board name or `None` for the only board, protocol, listener).
    pub boards: Vec<(Option<String>, PortKind, TcpListener)>,
    pub control: Option<UnixListener>,
}

/// Takes the sockets systemd passed in (LISTEN_FDS / LISTEN_FDNAMES), made non-blocking for
/// tokio. `Ok(None)` when there are none: the daemon binds its own.
pub fn passed_sockets() -> Result<Option<Passed>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Passed::default();
    for i in 0..fds.len() {
        let name = names.get(i).cloned().unwrap_or_default();
        let nonblocking =
            |e: std::io::Error| format!("cannot make the socket from systemd non-blocking: {e}");
        match parse_fd_name(&name)? {
            FdName::Control => {
                let listener = fds
                    .take_unix_listener(i)
                    .map_err(|e| {
                        format!("socket {i} passed by systemd (\"control\") is not a listening unix socket ({e}): esp-bridge.socket must use ListenStream=/run/esp-bridge/control.sock")
                    })?
                    .ok_or_else(|| format!("socket {i} passed by systemd was already taken"))?;
                listener.set_nonblocking(true).map_err(nonblocking)?;
                out.control = Some(listener);
            }
            FdName::Board { board, kind } => {
                let listener = fds
                    .take_tcp_listener(i)
                    .map_err(|e| {
                        format!("socket {i} passed by systemd (\"{name}\") is not a listening TCP socket ({e}): a board's socket unit must use ListenStream= with a port")
                    })?
                    .ok_or_else(|| format!("socket {i} passed by systemd was already taken"))?;
                listener.set_nonblocking(true).map_err(nonblocking)?;
                out.boards.push((board, kind, listener));
            }
        }
    }
    Ok(Some(out))
}

/// The notification socket, connected once and non-blocking: when PID 1 does not drain it
/// (its queue holds `net.unix.max_dgram_qlen` datagrams, 10 by default), a send fails with
/// EAGAIN instead of stalling the one thread that also moves every client's bytes. (The
/// sd-notify crate sends through a new blocking socket each time.)
static NOTIFY: OnceLock<Option<UnixDatagram>> = OnceLock::new();

fn notify_socket() -> Option<&'static UnixDatagram> {
    NOTIFY
        .get_or_init(|| {
            let path = std::env::var_os("NOTIFY_SOCKET")?;
            let sock = UnixDatagram::unbound().ok()?;
            let bytes = path.as_encoded_bytes();
            let connected = match bytes.strip_prefix(b"@") {
                // An abstract socket (systemd in a container names one so).
                Some(name) => {
                    SocketAddr::from_abstract_name(name).and_then(|addr| sock.connect_addr(&addr))
                }
                None => sock.connect(&path),
            };
            if let Err(e) = connected.and_then(|()| sock.set_nonblocking(true)) {
                tracing::warn!("cannot reach systemd's notification socket {path:?}: {e}");
                return None;
            }
            Some(sock)
        })
        .as_ref()
}

/// Sends one notification without waiting; false when it could not go out now.
fn notify(state: &[NotifyState]) -> bool {
    let Some(sock) = notify_socket() else {
        return true;
    };
    let mut msg = String::new();
    for s in state {
        msg.push_str(&s.to_string());
        msg.push('\n');
    }
    match sock.send(msg.as_bytes()) {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("sd_notify: {e}; sent again later if it matters");
            false
        }
    }
}

/// READY=1 still to be sent (the socket was full when it was due).
static READY_PENDING: AtomicBool = AtomicBool::new(false);

/// READY=1 with a first status line.
pub fn ready(status: &str) {
    if !status_line().send(status, Some(NotifyState::Ready)) {
        READY_PENDING.store(true, Ordering::Relaxed);
    }
}

/// STOPPING=1.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// WATCHDOG=1: the serving loop is alive. A ping that finds the socket full is dropped: the
/// next one comes half a watchdog period later.
pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
    retry();
}

/// Sends what is owed: READY=1 if it could not go out, and a status line held back by the
/// rate limit or a full socket. The supervisor calls it every second.
pub fn retry() {
    if READY_PENDING.load(Ordering::Relaxed) && notify(&[NotifyState::Ready]) {
        READY_PENDING.store(false, Ordering::Relaxed);
    }
    send_held_status();
}

/// Half the watchdog interval systemd asked for, if it asked.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// The least time between two STATUS= lines: a client flooding SET-BAUDRATE with alternating
/// rates changes the status line at every command, and each would be a message to PID 1.
const STATUS_GAP: Duration = Duration::from_millis(100);

/// The status line systemd has, and one held back by [`STATUS_GAP`] or a full socket (sent
/// with the next retry or status change, whichever comes first).
struct StatusLine {
    sent: String,
    sent_at: Option<Instant>,
    held: Option<String>,
}

static STATUS: Mutex<StatusLine> = Mutex::new(StatusLine {
    sent: String::new(),
    sent_at: None,
    held: None,
});

fn status_line() -> std::sync::MutexGuard<'static, StatusLine> {
    STATUS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl StatusLine {
    /// Sends `line` now, or holds it when the socket is full.
    fn send(&mut self, line: &str, extra: Option<NotifyState>) -> bool {
        let mut states = vec![NotifyState::Status(line)];
        states.extend(extra);
        if notify(&states) {
            self.sent.clear();
            self.sent.push_str(line);
            self.sent_at = Some(Instant::now());
            self.held = None;
            true
        } else {
            self.held = Some(line.to_string());
            false
        }
    }
}

/// STATUS=: one line saying what the service is doing (`systemctl status` shows it). Sent
/// only when it changes, and at most once per [`STATUS_GAP`]; a newer line in between waits
/// for the next retry or change.
pub fn status(line: &str) {
    let mut s = status_line();
    if s.sent == line {
        s.held = None;
        return;
    }
    if s.sent_at.is_some_and(|at| at.elapsed() < STATUS_GAP) {
        s.held = Some(line.to_string());
        return;
    }
    s.send(line, None);
}

/// Sends a status line held back by the rate limit or a full socket.
fn send_held_status() {
    let mut s = status_line();
    if let Some(line) = s.held.take()
        && s.sent != line
    {
        s.send(&line, None);
    }
}

/// Whether stderr is the stream systemd connected to the journal: JOURNAL_STREAM names its
/// device and inode. A child of a unit inherits the variable even when its own stderr goes
/// elsewhere (a file, a pipe), and then must keep writing there.
fn stderr_is_the_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match rustix::fs::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// Logs to the journal when systemd connected stderr to it (JOURNAL_STREAM), with structured
/// fields; to stderr otherwise (a terminal, tests, other init systems).
pub fn init_logging(verbose: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let level = if verbose {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let filter = tracing_subscriber::filter::LevelFilter::from_level(level);
    if stderr_is_the_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter)
            // Fields as they are named in the code (SESSION, PEER, ...), without journald's
            // default "F_" prefix: what `journalctl -o verbose` users will look for.
            .with(
                journald
                    .with_syslog_identifier("esp-bridge".into())
                    .with_field_prefix(None),
            )
            .init();
        return;
    }
    // Colours only for a person at a terminal: escape codes in a file or a pipe (a CI log,
    // `2>log`) are noise.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_told_apart_by_name_only() {
        let board = |b: Option<&str>, kind| FdName::Board {
            board: b.map(str::to_string),
            kind,
        };
        assert_eq!(parse_fd_name("control"), Ok(FdName::Control));
        assert_eq!(
            parse_fd_name("lab1.rfc2217"),
            Ok(board(Some("lab1"), PortKind::Rfc2217))
        );
        assert_eq!(
            parse_fd_name("lab-2.raw"),
            Ok(board(Some("lab-2"), PortKind::EspRaw))
        );
        assert_eq!(
            parse_fd_name("a.b.raw"),
            Ok(board(Some("a.b"), PortKind::EspRaw))
        );
        for unnamed in ["", "unknown", "esp-bridge.socket", "rfc2217"] {
            assert_eq!(
                parse_fd_name(unnamed),
                Ok(board(None, PortKind::Rfc2217)),
                "{unnamed}"
            );
        }
        assert_eq!(parse_fd_name("raw"), Ok(board(None, PortKind::EspRaw)));
        assert_eq!(
            parse_fd_name("lab1.console"),
            Ok(board(Some("lab1"), PortKind::Console))
        );
        for bad in ["lab1", "lab1.telnet", ".raw", "esp-bridge-raw.socket"] {
            let e = parse_fd_name(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("esp-bridge apply"), "{e}");
        }
    }
}
