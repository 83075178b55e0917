//! systemd glue, kept at the edge: sockets passed in by a `.socket` unit, readiness, status
//! and watchdog notifications, and logging to the journal.
//!
//! Everything here degrades to nothing outside systemd: without LISTEN_FDS the daemon binds
//! its own addresses, without NOTIFY_SOCKET notifications are no-ops, and without the journal
//! logs go to stderr.

use sd_notify::NotifyState;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The names a passed-in socket may carry (`FileDescriptorName=` in the socket unit). systemd
/// names sockets after their unit when the unit gives none.
const RFC2217_NAMES: &[&str] = &["rfc2217", "esp-bridge.socket", "unknown", ""];
/// The name that marks the ESP-aware raw port.
const RAW_NAME: &str = "raw";

/// A listening socket handed over by systemd.
#[derive(Debug)]
pub struct Inherited {
    pub name: String,
    pub listener: TcpListener,
    pub kind: crate::bridge::PortKind,
}

/// Takes the listening sockets systemd passed in (LISTEN_FDS / LISTEN_FDNAMES), made
/// non-blocking for tokio. `Ok(None)` when there are none: the daemon binds its own.
/// A socket named "raw", or on one of `raw_ports`, is the ESP-aware raw port; the rest are
/// RFC 2217.
pub fn inherited_listeners(raw_ports: &[u16]) -> Result<Option<Vec<Inherited>>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|v| v.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        let name = names.get(i).cloned().unwrap_or_default();
        let listener = match fds.take_tcp_listener(i) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) => {
                return Err(format!(
                    "socket {i} passed by systemd (name \"{name}\") is not a listening TCP socket ({e}): esp-bridge.socket must use ListenStream= only"
                ));
            }
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let kind = if name == RAW_NAME || raw_ports.contains(&port) {
            crate::bridge::PortKind::EspRaw
        } else if RFC2217_NAMES.contains(&name.as_str()) {
            crate::bridge::PortKind::Rfc2217
        } else {
            return Err(format!(
                "socket {i} passed by systemd is named \"{name}\", which esp-bridge does not know: use FileDescriptorName=rfc2217 (or none) for RFC 2217 and FileDescriptorName=raw for the raw port in esp-bridge.socket"
            ));
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make the socket from systemd non-blocking: {e}"))?;
        out.push(Inherited {
            name,
            listener,
            kind,
        });
    }
    Ok(Some(out))
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// READY=1 with a first status line.
pub fn ready(status: &str) {
    status_line().record(status);
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STOPPING=1.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// WATCHDOG=1: the serving loop is alive; also sends a status line the rate limit held back.
pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
    send_held_status();
}

/// Half the watchdog interval systemd asked for, if it asked.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// The least time between two STATUS= lines: a client flooding SET-BAUDRATE with alternating
/// rates changes the status line at every command, and each would be a message to PID 1.
const STATUS_GAP: Duration = Duration::from_millis(100);

/// The status line systemd has, and one held back by [`STATUS_GAP`] (sent with the next
/// watchdog ping or status change, whichever comes first).
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
    /// Records `line` as sent (returns false when systemd has it already).
    fn record(&mut self, line: &str) -> bool {
        self.held = None;
        if self.sent == line {
            return false;
        }
        self.sent.clear();
        self.sent.push_str(line);
        self.sent_at = Some(Instant::now());
        true
    }
}

/// STATUS=: one line saying what the service is doing (`systemctl status` shows it). Sent
/// only when it changes, and at most once per [`STATUS_GAP`]; a newer line in between waits
/// for the next watchdog ping or change.
pub fn status(line: &str) {
    let mut s = status_line();
    if s.sent_at.is_some_and(|at| at.elapsed() < STATUS_GAP) {
        if s.sent != line {
            s.held = Some(line.to_string());
        } else {
            s.held = None;
        }
        return;
    }
    if s.record(line) {
        notify(&[NotifyState::Status(line)]);
    }
}

/// Sends a status line held back by the rate limit.
fn send_held_status() {
    let mut s = status_line();
    if let Some(line) = s.held.take()
        && s.record(&line)
    {
        notify(&[NotifyState::Status(&line)]);
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
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
